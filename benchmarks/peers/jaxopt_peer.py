"""JAXopt peer (CPU, float64): ``jaxopt.implicit_diff.custom_root``; unrolled with ``lax.fori_loop``.

* cg: ``custom_root(optimality, solve=partial(jaxopt.linear_solve.solve_cg, maxiter=K, tol=0, atol=0))``
  (JAXopt's solve_cg wraps ``jax.scipy.sparse.linalg.cg``: x0=0, exactly K iterations with tol=0).
* neumann: JAXopt ships no Neumann-series solver, so a K-term Neumann solve written with ``lax.fori_loop``
  is passed as ``solve=`` to ``custom_root`` (JAXopt's documented hook for user linear solvers): the
  implicit-differentiation machinery is JAXopt's, the linear solver is ours.
* unrolled: K steps ``w <- w - alpha * jax.grad(L_T)(w, log_lam)`` in ``lax.fori_loop`` (static trip count,
  so reverse-mode differentiable), and ``jax.grad`` of L_V(w_K) w.r.t. log_lam.

The optimality function is ``jax.grad`` of the inner loss. The whole hypergradient function is
``jax.jit``-ed with the data as arguments (not baked-in constants); ``compile_s`` is the time of
``jit(f).lower(...).compile()``, which is excluded from ``times_s``. Each timed call ends with
``block_until_ready()``. XLA's CPU thread pool is sized by ``--threads`` through XLA_FLAGS, which is set
before the first JAX computation creates the backend.

    <jaxopt env>/bin/python benchmarks/peers/jaxopt_peer.py --problem p.npz --method cg --iters 20 \
        --repeats 5 --out r.json

Timing and memory: see _common.py.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import time

import _common
import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
from jax import lax

PEER = "jaxopt"


def main() -> None:
    args = _common.parse_args(PEER)  # sets XLA_FLAGS before the backend exists
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")
    prob = _common.load_problem(args.problem, args.alpha)
    names = ("X_train", "y_train", "X_val", "y_val", "w_star", "log_lam")
    data = tuple(jnp.asarray(prob[k]) for k in names)
    alpha, K = prob["alpha"], args.iters

    def bce(z: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def inner_loss(w: jax.Array, log_lam: jax.Array, X: jax.Array, y: jax.Array) -> jax.Array:
        return bce(X @ w, y) + 0.5 * jnp.sum(jnp.exp(log_lam) * w * w)

    optimality = jax.grad(inner_loss, argnums=0)

    def neumann_solve(matvec, b):
        def body(_, carry):
            term, acc = carry
            term = term - alpha * matvec(term)
            return term, acc + term

        _, acc = lax.fori_loop(0, K - 1, body, (b, b))
        return alpha * acc

    if args.method == "cg":
        solve = functools.partial(jaxopt.linear_solve.solve_cg, maxiter=K, tol=0.0, atol=0.0)
        notes = f"implicit_diff.custom_root + linear_solve.solve_cg(maxiter={K}, tol=0): {K} matvecs"
    elif args.method == "neumann":
        solve = neumann_solve
        notes = (
            f"implicit_diff.custom_root with a user Neumann solve ({K} terms, {K - 1} matvecs): "
            "JAXopt has no Neumann solver of its own"
        )
    else:
        notes = f"{K} GD steps in lax.fori_loop, jax.grad through them, under jax.jit"

    if args.method in ("cg", "neumann"):

        @jaxopt.implicit_diff.custom_root(optimality, solve=solve)
        def solver(w_init: jax.Array, log_lam: jax.Array, X: jax.Array, y: jax.Array) -> jax.Array:
            return w_init  # the inner problem is already solved: w_init = w_star is the root

        def outer(log_lam, Xt, yt, Xv, yv, w_star):
            return bce(Xv @ solver(w_star, log_lam, Xt, yt), yv)

    else:

        def outer(log_lam, Xt, yt, Xv, yv, w_star):
            def step(_, w):
                return w - alpha * optimality(w, log_lam, Xt, yt)

            return bce(Xv @ lax.fori_loop(0, K, step, w_star), yv)

    Xt, yt, Xv, yv, w_star, log_lam = data
    call_args = (log_lam, Xt, yt, Xv, yv, w_star)
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(outer)).lower(*call_args).compile()
    compile_s = time.perf_counter() - t0

    def hypergradient() -> jax.Array:
        return compiled(*call_args).block_until_ready()

    hg, times, peak, mem_method = _common.measure(hypergradient, args.repeats)
    _common.write_result(
        args,
        PEER,
        version=f"jaxopt {importlib.metadata.version('jaxopt')}, jax {jax.__version__}",
        hypergradient=np.asarray(hg),
        times=times,
        peak=peak,
        mem_method=mem_method,
        notes=notes,
        compile_s=compile_s,
        alpha=alpha,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


if __name__ == "__main__":
    main()
