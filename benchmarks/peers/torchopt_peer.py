"""TorchOpt peer: implicit hypergradients with ``torchopt.diff.implicit.custom_root``; unrolled with MetaSGD.

* cg: ``custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=K, rtol=0, atol=0))``.
  TorchOpt's CG starts from x0=0 but still evaluates ``A x0`` once, so it does K+1 matvecs.
* neumann: ``solve=torchopt.linear_solve.solve_inv(ns=True, maxiter=K-1, alpha=alpha)``. TorchOpt's
  ``maxiter`` counts matvecs: ``maxiter=m`` sums the m+1 terms ``alpha * sum_{j<=m} (I - alpha A)^j b``,
  so ``maxiter=K-1`` gives the benchmark's K-term sum.
* unrolled: ``torchopt.MetaSGD(module, lr=alpha)`` on an ``nn.Module`` holding w, K ``step(loss)`` calls
  from w_star, then ``L_V.backward()`` into log_lam.

The optimality function is ``torch.func.grad`` of the inner loss, as TorchOpt's implicit differentiation
runs ``functorch.vjp`` over it; each matvec is one call of the VJP function that ``functorch.vjp`` built
once (TorchOpt's own structure: the graph is not rebuilt per matvec).

    <torchopt env>/bin/python benchmarks/peers/torchopt_peer.py --problem p.npz --method cg --iters 20 \
        --repeats 5 --out r.json

Timing and memory: see _common.py.
"""

from __future__ import annotations

import importlib.metadata

import _common
import _torch_common
import torch
import torch.nn.functional as F
import torchopt
from torch import nn

PEER = "torchopt"


def main() -> None:
    args = _common.parse_args(PEER)
    prob, t = _torch_common.load(args)
    Xt, yt, Xv, yv = t["X_train"], t["y_train"], t["X_val"], t["y_val"]
    alpha, K = prob["alpha"], args.iters

    def inner_loss(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * torch.sum(log_lam.exp() * w * w)

    def outer_loss(w: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xv @ w, yv)

    notes = ""
    if args.method == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0, atol=0.0)
        notes = (
            f"custom_root + linear_solve.solve_cg(maxiter={K}, rtol=0, atol=0): {K + 1} matvecs (A@x0 once)"
        )
    elif args.method == "neumann":
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=K - 1, alpha=alpha)
        notes = f"custom_root + linear_solve.solve_inv(ns=True, maxiter={K - 1}, alpha): {K} terms"

    if args.method in ("cg", "neumann"):

        def optimality(
            w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            return torch.func.grad(inner_loss, argnums=0)(w, log_lam, X, y)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solver(
            w_init: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            return t["w_star"].clone()  # the inner problem is already solved: w_star is the root

        def hypergradient() -> torch.Tensor:
            log_lam = t["log_lam"].clone().requires_grad_(True)
            w = solver(t["w_star"], log_lam, Xt, yt)
            (hg,) = torch.autograd.grad(outer_loss(w), log_lam)
            return hg

    else:

        class Linear(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = nn.Parameter(t["w_star"].clone())

        def hypergradient() -> torch.Tensor:
            log_lam = t["log_lam"].clone().requires_grad_(True)
            net = Linear()
            opt = torchopt.MetaSGD(net, lr=alpha)
            for _ in range(K):
                opt.step(inner_loss(net.w, log_lam, Xt, yt))
            (hg,) = torch.autograd.grad(outer_loss(net.w), log_lam)
            return hg

        notes = f"torchopt.MetaSGD(lr=alpha), {K} differentiable step(loss) calls, one reverse pass"

    hg, times, peak, mem_method = _common.measure(hypergradient, args.repeats)
    _common.write_result(
        args,
        PEER,
        version=f"torchopt {importlib.metadata.version('torchopt')}, torch {torch.__version__}",
        hypergradient=hg.detach().numpy(),
        times=times,
        peak=peak,
        mem_method=mem_method,
        notes=notes,
        alpha=alpha,
    )


if __name__ == "__main__":
    main()
