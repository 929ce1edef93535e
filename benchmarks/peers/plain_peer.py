"""Plain-PyTorch-autograd reference: hand-written CG / Neumann / unrolled hypergradients.

Implicit methods build the graph of ``g = dL_T/dw`` ONCE (``create_graph=True``) and reuse it for every
Hessian-vector product ``H u = grad(g, w, u, retain_graph=True)``; the final mixed product
``-(d^2 L_T / dlog_lam dw) p = -grad(g, log_lam, p)`` reuses the same graph.

* cg: textbook CG from p=0, exactly ``--iters`` iterations (``--iters`` HVPs), no early stop.
* neumann: ``p = alpha * sum_{j=0}^{K-1} (I - alpha H)^j v`` with K = ``--iters`` (K-1 HVPs).
* unrolled: K steps ``w <- w - alpha dL_T/dw`` from w_star with ``create_graph=True``, then one
  reverse pass of L_V(w_K) to log_lam.

    python benchmarks/peers/plain_peer.py --problem p.npz --method cg --iters 20 --repeats 5 --out r.json

Timing and memory: see _common.py.
"""

from __future__ import annotations

import _common
import _torch_common
import torch
import torch.nn.functional as F

PEER = "plain-autograd"


def main() -> None:
    args = _common.parse_args(PEER)
    prob, t = _torch_common.load(args)
    Xt, yt, Xv, yv = t["X_train"], t["y_train"], t["X_val"], t["y_val"]
    alpha, K = prob["alpha"], args.iters

    def inner_loss(w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.5 * torch.sum(log_lam.exp() * w * w)

    def outer_loss(w: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xv @ w, yv)

    def implicit() -> torch.Tensor:
        w = t["w_star"].clone().requires_grad_(True)
        log_lam = t["log_lam"].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(inner_loss(w, log_lam), w, create_graph=True)
        (v,) = torch.autograd.grad(outer_loss(w), w)

        def hvp(u: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(g, w, u, retain_graph=True)[0]

        with torch.no_grad():
            if args.method == "cg":
                p = torch.zeros_like(v)
                r = v.clone()
                d = r.clone()
                rs = r @ r
                for _ in range(K):
                    Hd = hvp(d)
                    a = rs / (d @ Hd)
                    p += a * d
                    r -= a * Hd
                    rs_new = r @ r
                    d = r + (rs_new / rs) * d
                    rs = rs_new
            else:
                term = v.clone()
                acc = v.clone()
                for _ in range(K - 1):
                    term = term - alpha * hvp(term)
                    acc += term
                p = alpha * acc
        (mixed,) = torch.autograd.grad(g, log_lam, p)
        return -mixed

    def unrolled() -> torch.Tensor:
        log_lam = t["log_lam"].clone().requires_grad_(True)
        w = t["w_star"].clone().requires_grad_(True)
        for _ in range(K):
            (g,) = torch.autograd.grad(inner_loss(w, log_lam), w, create_graph=True)
            w = w - alpha * g
        (hg,) = torch.autograd.grad(outer_loss(w), log_lam)
        return hg

    fn = unrolled if args.method == "unrolled" else implicit
    hg, times, peak, mem_method = _common.measure(fn, args.repeats)
    notes = {
        "cg": f"hand-written CG, {K} iterations = {K} HVPs, graph of dL_T/dw built once",
        "neumann": f"hand-written Neumann, {K} terms = {K - 1} HVPs, graph of dL_T/dw built once",
        "unrolled": f"{K} differentiable GD steps (create_graph=True), one reverse pass",
    }[args.method]
    _common.write_result(
        args,
        PEER,
        version=f"torch {torch.__version__}",
        hypergradient=hg.detach().numpy(),
        times=times,
        peak=peak,
        mem_method=mem_method,
        notes=notes,
        alpha=alpha,
    )


if __name__ == "__main__":
    main()
