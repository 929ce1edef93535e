"""How accurate is ``hvp_mode="finite-difference"``, and how does that depend on cond(H)? (measured)

    .venv/bin/python benchmarks/fd_hvp_accuracy.py   # one thread; the table of docs/finite-difference-hvp.md

Problems: ``tests/library/problems.py``'s ``conditioned_logistic(κ)`` (binary logistic regression, 60
weights, one L2 per weight, cond(H) at ``w*`` within 1 % of κ) for κ = 1e1 … 1e4, and the tests'
``ridge``, ``logistic`` and ``mlp``; ``w*`` by Newton in float64, the float32 rows the same data
and weights cast to float32. Columns:

* ``cond(H)``: of the dense float64 Hessian at ``w*``;
* ``HVP, random v``: ``‖H_fd v − Hv‖/‖Hv‖`` for a Gaussian ``v``, median of 5, against the dense
  float64 ``H`` (``H_fd v`` the central difference of two gradients, step ``fd_step``);
* ``HVP, unit columns``: the same along every unit vector ``e_i`` (what ``hg.Exact`` builds ``H``
  from), median and maximum over ``i``;
* ``Exact, fd``: ``‖g_fd − g*‖/‖g*‖``, ``hg.Exact()`` with finite-difference products against
  the float64 IFT reference ``g*``; ``Exact, reverse``: the same with double-backward products in
  the same dtype (what the dtype itself allows).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

import hypergradients as hg
from hypergradients.core import tree
from hypergradients.core.derivatives import InnerDerivatives

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "library"))
import problems as P  # noqa: E402  (the shared problems with known answers live with the tests)
from test_fd_hvp import hvp_error, in_dtype  # noqa: E402  (the same measurement as the tests')

KAPPAS = (1e1, 1e2, 1e3, 1e4)
FD = "finite-difference"


def column_errors(prob: P.Problem, dtype: torch.dtype) -> list[float]:
    """``‖H_fd e_i − H e_i‖/‖H e_i‖`` for every unit vector ``e_i`` (H the dense float64 Hessian)."""
    _, inner, w, lam = in_dtype(prob, dtype)
    D = InnerDerivatives(
        inner,
        tree.clone_leaves(w, requires_grad=True),
        tree.clone_leaves(lam, requires_grad=True),
        hvp_mode=FD,
    )
    n = prob.hessian.shape[0]
    eye = torch.eye(n, dtype=dtype)
    errs = []
    for i in range(n):
        got = tree.flatten(D.hvp(tree.unflatten(eye[i], w))).double()
        ref = prob.hessian[:, i]
        errs.append(float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)))
    return errs


def exact_errors(prob: P.Problem, dtype: torch.dtype) -> tuple[float, float]:
    outer, inner, w, lam = in_dtype(prob, dtype)
    ref = {k: t.double() for k, t in prob.reference.items()}
    out = []
    for mode in (FD, "reverse"):
        g = hg.hypergradient(outer, inner, w, lam, method=hg.Exact(), hvp_mode=mode)  # type: ignore[arg-type]
        out.append(P.rel_err({k: t.double() for k, t in g.items()}, ref))
    return out[0], out[1]


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    probs = [P.conditioned_logistic(k) for k in KAPPAS] + [make() for make in P.ALL.values()]
    print(
        "| problem | cond(H) | dtype | HVP, random v | HVP, unit columns: median | max | Exact, fd | "
        "Exact, reverse |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for prob in probs:
        ev = torch.linalg.eigvalsh(prob.hessian)
        cond = float(ev[-1] / ev[0])
        for dt in (torch.float32, torch.float64):
            rnd = statistics.median(hvp_error(prob, dt, seed=s) for s in range(5))
            cols = column_errors(prob, dt)
            fd, rev = exact_errors(prob, dt)
            print(
                f"| {prob.name} | {cond:.3g} | {str(dt)[6:]} | {rnd:.1e} | {statistics.median(cols):.1e} | "
                f"{max(cols):.1e} | {fd:.1e} | {rev:.1e} |"
            )
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
