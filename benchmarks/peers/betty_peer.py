"""Betty (betty-ml 0.2.x) peer: the hypergradient of one upper-level step of a Betty ``Engine``.

Betty has no "compute one hypergradient" call: a hypergradient is produced inside ``Engine.run()`` when the
upper ``Problem`` steps after its lower ``Problem`` has taken ``unroll_steps`` optimizer steps. The
adapter therefore times exactly one hyper-step of a freshly built two-level program (the Engine and
Problems are built before the timer starts, untimed, because Betty keeps step counters and optimizer
state that make an Engine single-use):

* lower problem ``inner`` (w, initialised to w_star): ``training_step`` = L_T(w, log_lam);
* upper problem ``outer`` (log_lam): ``training_step`` = L_V(w); its ``grad_callback`` hook (called by
  Betty after the backward pass and before the optimizer step) copies ``log_lam.grad``, which is the
  hypergradient. Both optimizers are ``torch.optim.SGD``.
* cg / neumann: ``inner`` is an ``ImplicitProblem`` with ``Config(type="cg", cg_iterations=K,
  cg_alpha=1)`` or ``Config(type="neumann", neumann_iterations=K-1, neumann_alpha=alpha)`` (Betty's
  ``neumann_iterations=m`` sums m+1 terms, so K-1 gives the benchmark's K-term sum); ``EngineConfig(
  train_iters=1)``. The inner SGD has ``lr=0`` so that w is still exactly w_star when the upper level
  differentiates (Betty always takes the inner step first). The timed hyper-step therefore also contains
  one inner gradient evaluation, Betty's bookkeeping, and its re-evaluation of L_T inside the hypergradient
  routine: that is the cost of one hypergradient through Betty's API.
* unrolled: ``inner`` is an ``IterativeProblem`` (functional parameters, differentiable SGD with
  ``lr=alpha``) with ``unroll_steps=K``; ``outer`` has ``first_order=False`` so its backward goes through
  the K unrolled steps; ``EngineConfig(train_iters=K)``. This is Betty's own route to unrolled
  hypergradients, and in betty-ml 0.2.1 it cannot run: ``IterativeProblem.initialize()`` calls
  ``Problem.initialize()``, which already calls the overridden ``patch_optimizer()`` (replacing the torch
  SGD by Betty's ``DifferentiableSGD``, whose param_groups have no "params" key); it then calls
  ``initialize_optimizer_state()``, which iterates ``param_group["params"]`` -> ``KeyError: 'params'``.
  Skipping that method only moves the failure: ``patch_optimizer()`` is called a second time and
  ``betty.optim.patch_optimizer`` asserts that a ``DifferentiableSGD`` is a torch optimizer type
  (AssertionError); and ``IterativeProblem.optimizer_step`` / ``HigherIterativeProblem`` read
  ``self._fp16``, an attribute ``Problem`` no longer defines (replaced by ``precision``) -> AttributeError.
  Making it run would mean rewriting Betty's initialisation, so the adapter runs the idiomatic code,
  catches the failure and reports ``status: "error"`` with the exception.

Betty's "cg" (betty/hypergradient/cg.py) is not the textbook conjugate-gradient recurrence: the new search
direction is built from the OLD residual (``p_new = r + beta * p`` instead of ``r_new + beta * p``), so
its result differs from CG's (compare against ``cg{K}_hypergradient`` from make_problem.py).

    <betty env>/bin/python benchmarks/peers/betty_peer.py --problem p.npz --method cg --iters 20 \
        --repeats 5 --out r.json

Timing and memory: see _common.py.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings

import _common
import _torch_common
import torch
import torch.nn.functional as F
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem, IterativeProblem
from torch import nn

PEER = "betty"


def main() -> None:
    args = _common.parse_args(PEER)
    logging.disable(logging.INFO)  # Betty logs every initialisation at INFO level
    warnings.filterwarnings("ignore", category=FutureWarning)  # functorch deprecation notices
    prob, t = _torch_common.load(args)
    Xt, yt, Xv, yv = t["X_train"], t["y_train"], t["X_val"], t["y_val"]
    alpha, K = prob["alpha"], args.iters
    unrolled = args.method == "unrolled"
    captured: dict[str, torch.Tensor] = {}

    class Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(t["w_star"].clone())

    class LogLam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_lam = nn.Parameter(t["log_lam"].clone())

    def inner_w(problem) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return problem.params[0] if unrolled else problem.module.w

    base = IterativeProblem if unrolled else ImplicitProblem

    class Inner(base):  # type: ignore[misc,valid-type]
        def get_batch(self):  # type: ignore[no-untyped-def]
            return (Xt, yt)

        def training_step(self, batch):  # type: ignore[no-untyped-def]
            X, y = batch
            w = inner_w(self)
            log_lam = self.outer.module.log_lam
            return F.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * torch.sum(log_lam.exp() * w * w)

    class Outer(ImplicitProblem):  # type: ignore[misc]
        def get_batch(self):  # type: ignore[no-untyped-def]
            return (Xv, yv)

        def training_step(self, batch):  # type: ignore[no-untyped-def]
            X, y = batch
            return F.binary_cross_entropy_with_logits(X @ inner_w(self.inner), y)

        def grad_callback(self) -> None:
            captured["hg"] = self.module.log_lam.grad.detach().clone()

    if args.method == "cg":
        inner_cfg = Config(type="cg", cg_iterations=K, cg_alpha=1.0, unroll_steps=1)
        notes = f"ImplicitProblem Config(type='cg', cg_iterations={K}, cg_alpha=1); one Engine hyper-step"
    elif args.method == "neumann":
        inner_cfg = Config(type="neumann", neumann_iterations=K - 1, neumann_alpha=alpha, unroll_steps=1)
        notes = (
            f"ImplicitProblem Config(type='neumann', neumann_iterations={K - 1}, neumann_alpha=alpha) "
            f"= {K} terms; one Engine hyper-step"
        )
    else:
        inner_cfg = Config(unroll_steps=K)
        notes = (
            f"IterativeProblem, unroll_steps={K}, outer first_order=False, differentiable SGD(lr=alpha); "
            "IterativeProblem cannot be initialised in betty-ml 0.2.1 (see the betty_peer.py docstring)"
        )
    outer_cfg = Config(first_order=not unrolled, retain_graph=True)

    def setup() -> Engine:
        captured.clear()
        w_mod, lam_mod = Weights(), LogLam()
        inner = Inner(
            name="inner",
            config=inner_cfg,
            module=w_mod,
            optimizer=torch.optim.SGD(w_mod.parameters(), lr=alpha if unrolled else 0.0),
        )
        outer = Outer(
            name="outer",
            config=outer_cfg,
            module=lam_mod,
            optimizer=torch.optim.SGD(lam_mod.parameters(), lr=0.0),
        )
        deps = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
        engine_cfg = EngineConfig(train_iters=K if unrolled else 1, strategy="cpu", logger_type="none")
        return Engine(problems=[outer, inner], config=engine_cfg, dependencies=deps)

    def hyperstep(engine: Engine) -> torch.Tensor:
        engine.run()
        return captured["hg"]

    version = f"betty-ml {importlib.metadata.version('betty-ml')}, torch {torch.__version__}"
    try:
        hg, times, peak, mem_method = _common.measure(hyperstep, args.repeats, setup=setup)
    except Exception as exc:
        if not unrolled:
            raise
        _common.write_result(
            args,
            PEER,
            version=version,
            status="error",
            notes=(
                f"Betty's IterativeProblem (its unrolled-differentiation problem type) failed: "
                f"{type(exc).__name__}: {exc}. Known causes in betty-ml 0.2.1: "
                "IterativeProblem.initialize -> "
                "initialize_optimizer_state indexes param_group['params'] after the optimizer was already "
                "swapped for DifferentiableSGD (KeyError 'params'); behind it, a second patch_optimizer() "
                "call (AssertionError) and the undefined self._fp16 read by optimizer_step"
            ),
        )
        return
    _common.write_result(
        args,
        PEER,
        version=version,
        hypergradient=hg.numpy(),
        times=times,
        peak=peak,
        mem_method=mem_method,
        notes=notes,
        alpha=alpha,
    )


if __name__ == "__main__":
    main()
