"""higher peer: unrolled hypergradient with ``higher.innerloop_ctx``.

* unrolled: an ``nn.Module`` holding w (initialised to w_star) and ``torch.optim.SGD(lr=alpha)`` are
  wrapped by ``higher.innerloop_ctx(net, opt, copy_initial_weights=True)``; K ``diffopt.step(loss)``
  calls, then ``torch.autograd.grad(L_V(fmodel params), log_lam)``.
* cg / neumann: not offered. higher only differentiates through unrolled optimisation loops; it has no
  implicit-function-theorem / linear-solve API. The script writes ``status: "not_offered"``.

    <higher env>/bin/python benchmarks/peers/higher_peer.py --problem p.npz --method unrolled --iters 100 \
        --repeats 5 --out r.json

Timing and memory: see _common.py.
"""

from __future__ import annotations

import importlib.metadata

import _common
import _torch_common
import higher
import torch
import torch.nn.functional as F
from torch import nn

PEER = "higher"


def main() -> None:
    args = _common.parse_args(PEER)
    version = f"higher {importlib.metadata.version('higher')}, torch {torch.__version__}"
    if args.method != "unrolled":
        _common.write_result(
            args,
            PEER,
            version=version,
            status="not_offered",
            notes="higher has no implicit (IFT / linear-solve) hypergradient API, only unrolled",
        )
        return
    prob, t = _torch_common.load(args)
    Xt, yt, Xv, yv = t["X_train"], t["y_train"], t["X_val"], t["y_val"]
    alpha, K = prob["alpha"], args.iters

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(t["w_star"].clone())

        def forward(self, X: torch.Tensor) -> torch.Tensor:
            return X @ self.w

    net = Linear()
    opt = torch.optim.SGD(net.parameters(), lr=alpha)

    def hypergradient() -> torch.Tensor:
        log_lam = t["log_lam"].clone().requires_grad_(True)
        with higher.innerloop_ctx(net, opt, copy_initial_weights=True) as (fnet, diffopt):
            for _ in range(K):
                (w,) = fnet.parameters()
                loss = F.binary_cross_entropy_with_logits(fnet(Xt), yt) + 0.5 * torch.sum(
                    log_lam.exp() * w * w
                )
                diffopt.step(loss)
            (hg,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(fnet(Xv), yv), log_lam)
        return hg

    hg, times, peak, mem_method = _common.measure(hypergradient, args.repeats)
    _common.write_result(
        args,
        PEER,
        version=version,
        hypergradient=hg.detach().numpy(),
        times=times,
        peak=peak,
        mem_method=mem_method,
        notes=f"higher.innerloop_ctx + SGD(lr=alpha), {K} diffopt.step calls, one reverse pass",
        alpha=alpha,
    )


if __name__ == "__main__":
    main()
