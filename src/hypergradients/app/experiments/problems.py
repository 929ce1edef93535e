"""Small bilevel problems on bundled data, solved to float64 precision, with their exact answers.

Every problem is a linear model with **one weight decay per weight** (Lorraine et al. 2020, §5.1):

    L_T(w, λ) = (1/n) Σ_i ℓ(x_iᵀW + b, y_i) + ½ Σ_j e^{λ_j} W_j²,      L_V(w) = (1/n_v) Σ_i ℓ(x_iᵀW + b, y_i)

over the training and validation sets; ``λ = log weight decay`` (an unconstrained log scale, so
any real λ is a valid decay) and the bias is not decayed. The mixed partial is therefore
``∂²L_T/∂W_j∂λ_j = e^{λ_j} W_j`` (diagonal), and ``L_V`` does not depend on λ (no direct term).

* :func:`diabetes_ridge` — ``sklearn.datasets.load_diabetes`` (442 × 10), ℓ = ½(·)²: a quadratic
  inner problem, so ``w*`` is one linear solve and ``H`` is constant.
* :func:`logistic_problem` — ``"breast-cancer"`` (``load_breast_cancer``, 569 × 30, binary:
  ℓ = log(1 + e^{−ỹ z}) on one logit) or ``"digits"`` (:func:`hypergradients.app.datasets.load_dataset`,
  64 pixels, 10 classes: softmax cross-entropy).

Features are standardised with training-set statistics. ``w*`` comes from damped Newton in
float64 to ``‖∇L_T‖ ≤ 1e-12`` (quadratic convergence makes this a handful of dense solves on
these sizes), so that the Neumann–SGD theorem can be seen at float64 precision: started at an
imprecise ``w*`` the unrolled iterates drift by ``α‖∇L_T‖`` per step and the theorem only holds
to that accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

import hypergradients as hg

from ...core import tree
from ...core.tree import Tree

DT = torch.float64
Loss = Callable[[Tree, Tree], Tensor]
HessianFn = Callable[[Tree, Tree], Tensor]  # (w, λ) -> dense ∂²L_T/∂w∂wᵀ, flattened in key order
BatchLoss = Callable[[Tree, Tree, Tensor], Tensor]  # (w, λ, training row indices) -> minibatch L_T

PROBLEMS = ("breast-cancer", "digits", "diabetes")
BIAS_DECAY = 1e-2  # fixed, not a hyperparameter: only the softmax problem needs it (see below)


@dataclass
class BilevelProblem:
    """A solved problem: losses, ``w*``, ``λ``, and dense facts about ``H = ∂²L_T/∂w∂wᵀ`` at ``w*``.

    ``hessian_fn(w, λ)`` is the closed-form dense Hessian of ``L_T`` and ``hessian`` its value
    ``H`` at ``w*`` (flattened in ``params``' key order), ``lambda_max`` / ``lambda_min`` its
    extreme eigenvalues, ``exact`` the IFT hypergradient
    ``−(∂²L_T/∂λ∂wᵀ) H⁻¹ ∂L_V/∂w`` by a dense solve (:class:`hypergradients.Exact`),
    ``grad_norm`` the ``‖∇_w L_T(w*)‖`` reached by Newton. ``batch_loss(w, λ, idx)`` is ``L_T`` with
    the data term averaged over the training rows ``idx`` only (a minibatch; the penalty unchanged),
    so that ``batch_loss(w, λ, arange(n_train))`` is ``inner_loss(w, λ)``.
    """

    name: str
    inner_loss: Loss
    outer_loss: Loss
    params: Tree
    hparams: Tree
    n_train: int
    n_val: int
    source: str
    hessian_fn: HessianFn = field(repr=False)
    hessian: Tensor = field(repr=False)
    lambda_max: float
    lambda_min: float
    exact: Tree = field(repr=False)
    grad_norm: float
    newton_iters: int
    batch_loss: BatchLoss | None = field(default=None, repr=False)

    @property
    def n_weights(self) -> int:
        return tree.numel(self.params)

    @property
    def n_hparams(self) -> int:
        return tree.numel(self.hparams)

    @property
    def condition_number(self) -> float:
        return self.lambda_max / self.lambda_min

    def zeros(self) -> Tree:
        """The cold start ``w₀ = 0``."""
        return tree.zeros_like(self.params)

    def summary(self) -> dict[str, object]:
        """JSON-ready facts about the problem."""
        return {
            "name": self.name,
            "source": self.source,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_weights": self.n_weights,
            "n_hparams": self.n_hparams,
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "condition_number": self.condition_number,
            "grad_norm_at_w_star": self.grad_norm,
            "newton_iters": self.newton_iters,
            "weight_decay_range": [
                float(torch.exp(self.hparams["log_weight_decay"]).min()),
                float(torch.exp(self.hparams["log_weight_decay"]).max()),
            ],
        }


def _standardize(x: Tensor, *others: Tensor) -> list[Tensor]:
    """``(x − mean)/std`` with the first tensor's statistics; constant features are only centred."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std < 1e-8, torch.ones_like(std), std)
    return [(t - mean) / std for t in (x, *others)]


def _split(n: int, n_train: int, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def _log_decays(shape: tuple[int, ...], low: float, high: float, seed: int) -> Tensor:
    """Per-weight log decays spread uniformly in ``[log low, log high]`` (seeded, so reproducible).

    A spread rather than one shared value makes the hypergradient a genuinely per-weight
    vector, as in the paper's experiment, instead of a rescaled copy of ``W*``.
    """
    if not 0 < low <= high:
        raise hg.HypergradientError(f"weight decay range must satisfy 0 < low <= high, got [{low}, {high}]")
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    lo, hi = torch.log(torch.tensor(low, dtype=DT)), torch.log(torch.tensor(high, dtype=DT))
    return lo + (hi - lo) * u


class NewtonResult(NamedTuple):
    """``x`` the last iterate, ``grad_norm`` ``‖∇f(x)‖``, ``iters`` the Newton steps taken, ``converged``
    whether ``grad_norm <= tol``."""

    x: Tensor
    grad_norm: float
    iters: int
    converged: bool


def newton(
    grad: Callable[[Tensor], Tensor],
    hessian: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    tol: float,
    max_iter: int = 100,
    f: Callable[[Tensor], Tensor] | None = None,
    shift_indefinite: bool = False,
    polish: int = 0,
) -> NewtonResult:
    """Newton's method on a flat vector: ``x ← x − t·(H + μI)⁻¹∇f(x)`` until ``‖∇f(x)‖ ≤ tol``.

    The one Newton solve behind every problem with a known answer (here, in the benchmark and in
    the tests' ``problems.py``). ``t = 1`` when ``f`` is not given (strictly convex problems whose
    start lies where Newton converges quadratically); with ``f``, ``t`` halves from 1 until the
    Armijo condition ``f(x − t·step) ≤ f(x) − 1e-4·t·∇fᵀstep`` holds (or ``t ≤ 1e-10``).
    ``μ = 0``, unless ``shift_indefinite`` and ``λ_min(H) ≤ 0``: then ``μ = −λ_min + 1e-3``, so the
    step is a descent direction on a non-convex ``f``. ``polish``: at most that many further full
    steps once converged, each kept only if it halves ``‖∇f‖`` (down to rounding: a theorem checked
    at float64 precision sees every bit of ``‖∇f(w*)‖`` left).
    """
    x = x0.detach().clone()
    g = grad(x)
    gn = float(g.norm())
    it = 0
    while gn > tol and it < max_iter:
        H = hessian(x)
        if shift_indefinite:
            lam_min = float(torch.linalg.eigvalsh(H)[0])
            if lam_min <= 0:
                H = H + (-lam_min + 1e-3) * torch.eye(len(x), dtype=H.dtype)
        step = torch.linalg.solve(H, g)
        t = 1.0
        if f is not None:
            with torch.no_grad():
                fx, slope = float(f(x)), float(g @ step)
                while float(f(x - t * step)) > fx - 1e-4 * t * slope and t > 1e-10:
                    t *= 0.5
        x = x - t * step
        g = grad(x)
        gn = float(g.norm())
        it += 1
    if gn <= tol:
        for _ in range(polish):
            x_new = x - torch.linalg.solve(hessian(x), g)
            g_new = grad(x_new)
            if not float(g_new.norm()) < 0.5 * gn:
                break
            x, g, gn = x_new, g_new, float(g_new.norm())
    return NewtonResult(x, gn, it, gn <= tol)


def newton_minimize(
    loss: Loss, hessian: HessianFn, params: Tree, hparams: Tree, *, tol: float = 1e-12, max_iter: int = 100
) -> tuple[Tree, float, int]:
    """Minimise ``loss(·, hparams)`` by :func:`newton` with Armijo backtracking; ``(w*, ‖∇‖, iters)``.

    ``hessian(w, λ)`` is the problem's closed-form dense Hessian (any positive definite matrix
    close to it would do: only the gradient, by autograd, decides where Newton stops). The losses
    here are strictly convex (every weight decayed, the bias's curvature positive), so the Newton
    step is a descent direction and convergence is quadratic near ``w*``; three polishing steps
    take ``‖∇L_T‖`` to rounding level.
    """
    lam = tree.detach(hparams)

    def f(x: Tensor) -> Tensor:
        return loss(tree.unflatten(x, params), lam)

    def gradient(x: Tensor) -> Tensor:
        xr = x.clone().requires_grad_(True)
        return torch.autograd.grad(f(xr), xr)[0]

    res = newton(
        gradient,
        lambda x: hessian(tree.unflatten(x, params), lam),
        tree.flatten(params),
        tol=tol,
        max_iter=max_iter,
        f=f,
        polish=3,
    )
    if not res.converged:
        raise hg.HypergradientError(
            f"Newton did not reach ‖∇L_T‖ <= {tol:g} in {max_iter} iterations (last "
            f"{res.grad_norm:.3g}); lower the tolerance or raise the weight decays"
        )
    return tree.unflatten(res.x, params), res.grad_norm, res.iters


def _finish(
    name: str,
    inner: Loss,
    outer: Loss,
    hessian: HessianFn,
    params0: Tree,
    hparams: Tree,
    *,
    n_train: int,
    n_val: int,
    source: str,
    batch_loss: BatchLoss | None = None,
) -> BilevelProblem:
    """Solve for ``w*`` and the exact hypergradient in closed form.

    With the mixed partial ``∂²L_T/∂W∂λ = diag(e^λ ⊙ W*)`` (and zero for the bias), the IFT gives
    ``dL_V/dλ = −e^λ ⊙ W* ⊙ [H⁻¹ ∂L_V/∂w]_W`` (no direct term: L_V does not contain λ).
    """
    w_star, gn, iters = newton_minimize(inner, hessian, params0, hparams)
    H = hessian(w_star, hparams)
    ev = torch.linalg.eigvalsh(H)
    w = tree.clone_leaves(w_star, requires_grad=True)
    v = tree.flatten(tree.as_tree(torch.autograd.grad(outer(w, hparams), list(w.values())), w))
    p = tree.unflatten(torch.linalg.solve(H, v), w_star)
    exact = {"log_weight_decay": -torch.exp(hparams["log_weight_decay"]) * w_star["weight"] * p["weight"]}
    return BilevelProblem(
        name,
        inner,
        outer,
        w_star,
        hparams,
        n_train,
        n_val,
        source,
        hessian,
        H,
        float(ev[-1]),
        float(ev[0]),
        exact,
        gn,
        iters,
        batch_loss,
    )


def _augment(X: Tensor) -> Tensor:
    """``[X, 1]``: the bias as one more feature, matching the flattening order (weight, then bias)."""
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)


def diabetes_ridge(
    *, n_train: int = 300, decay: tuple[float, float] = (1e-3, 1e-1), seed: int = 0
) -> BilevelProblem:
    """Ridge regression on sklearn's diabetes data (442 × 10), target standardised too."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    X = torch.as_tensor(data.data, dtype=DT)
    y = torch.as_tensor(data.target, dtype=DT)
    if not 2 <= n_train <= len(y) - 2:
        raise hg.HypergradientError(f"n_train={n_train} must be in [2, {len(y) - 2}] for diabetes")
    tr, va = _split(len(y), n_train, seed)
    Xt, Xv = _standardize(X[tr], X[va])
    mu, sd = y[tr].mean(), y[tr].std(unbiased=False)
    yt, yv = (y[tr] - mu) / sd, (y[va] - mu) / sd
    d = X.shape[1]
    hparams = {"log_weight_decay": _log_decays((d,), *decay, seed)}

    def inner(p: Tree, h: Tree) -> Tensor:
        r = Xt @ p["weight"] + p["bias"] - yt
        return 0.5 * (r @ r) / len(yt) + 0.5 * torch.sum(torch.exp(h["log_weight_decay"]) * p["weight"] ** 2)

    def outer(p: Tree, h: Tree) -> Tensor:
        r = Xv @ p["weight"] + p["bias"] - yv
        return 0.5 * (r @ r) / len(yv)

    def batch(p: Tree, h: Tree, idx: Tensor) -> Tensor:
        r = Xt[idx] @ p["weight"] + p["bias"] - yt[idx]
        return 0.5 * (r @ r) / len(idx) + 0.5 * torch.sum(torch.exp(h["log_weight_decay"]) * p["weight"] ** 2)

    Xa = _augment(Xt)

    def hessian(w: Tree, h: Tree) -> Tensor:
        """``X̃ᵀX̃/n + diag(e^λ, 0)``, constant in w."""
        return Xa.T @ Xa / len(yt) + torch.diag(
            torch.cat([torch.exp(h["log_weight_decay"].detach()), torch.zeros(1, dtype=DT)])
        )

    params0 = {"weight": torch.zeros(d, dtype=DT), "bias": torch.zeros((), dtype=DT)}
    return _finish(
        "diabetes",
        inner,
        outer,
        hessian,
        params0,
        hparams,
        n_train=len(tr),
        n_val=len(va),
        source="sklearn.datasets.load_diabetes (ridge regression)",
        batch_loss=batch,
    )


def _breast_cancer(n_train: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int, str]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = torch.as_tensor(data.data, dtype=DT)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    if not 2 <= n_train <= len(y) - 2:
        raise hg.HypergradientError(f"n_train={n_train} must be in [2, {len(y) - 2}] for breast-cancer")
    tr, va = _split(len(y), n_train, seed)
    return X[tr], y[tr], X[va], y[va], 2, "sklearn.datasets.load_breast_cancer (binary logistic)"


def _digits(n_train: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int, str]:
    from ..datasets import load_dataset

    ds = load_dataset("digits", seed=seed, n_train=n_train, dtype=DT)
    return (
        ds.x_train,
        ds.y_train,
        ds.x_val,
        ds.y_val,
        ds.num_classes,
        "hypergradients.app.datasets.load_dataset('digits') (softmax regression)",
    )


def logistic_problem(
    name: str = "breast-cancer",
    *,
    n_train: int = 300,
    decay: tuple[float, float] = (1e-3, 1e-1),
    seed: int = 0,
) -> BilevelProblem:
    """Logistic regression with one weight decay per weight on ``"breast-cancer"`` or ``"digits"``.

    Two classes use one logit ``z = xᵀW + b`` and ``ℓ = softplus(−ỹz)``, ``ỹ = ±1``; more use
    ``W ∈ R^{d×C}``, ``b ∈ R^C``, softmax cross-entropy and a fixed decay ``½·BIAS_DECAY·‖b‖²``.
    """
    if name == "breast-cancer":
        Xt, yt, Xv, yv, c, source = _breast_cancer(n_train, seed)
    elif name == "digits":
        Xt, yt, Xv, yv, c, source = _digits(n_train, seed)
    else:
        raise hg.HypergradientError(f"unknown logistic problem {name!r}; use 'breast-cancer' or 'digits'")
    Xt, Xv = _standardize(Xt, Xv)
    d = Xt.shape[1]
    shape: tuple[int, ...] = (d,) if c == 2 else (d, c)
    hparams = {"log_weight_decay": _log_decays(shape, *decay, seed)}

    def data_loss(p: Tree, X: Tensor, y: Tensor) -> Tensor:
        z = X @ p["weight"] + p["bias"]
        if c == 2:
            return torch.nn.functional.softplus(-(2.0 * y - 1.0) * z).mean()
        return torch.nn.functional.cross_entropy(z, y)

    # Softmax is unchanged by adding one constant to every logit, so with an undecayed bias H
    # would be singular along b + t·1: a fixed small decay on b removes that flat direction.
    bias_decay = 0.0 if c == 2 else BIAS_DECAY

    def inner(p: Tree, h: Tree) -> Tensor:
        return (
            data_loss(p, Xt, yt)
            + 0.5 * torch.sum(torch.exp(h["log_weight_decay"]) * p["weight"] ** 2)
            + 0.5 * bias_decay * torch.sum(p["bias"] ** 2)
        )

    def outer(p: Tree, h: Tree) -> Tensor:
        return data_loss(p, Xv, yv)

    def batch(p: Tree, h: Tree, idx: Tensor) -> Tensor:
        penalty = 0.5 * torch.sum(torch.exp(h["log_weight_decay"]) * p["weight"] ** 2)
        return data_loss(p, Xt[idx], yt[idx]) + penalty + 0.5 * bias_decay * torch.sum(p["bias"] ** 2)

    def hessian(w: Tree, h: Tree) -> Tensor:
        decay = torch.cat(
            [
                torch.exp(h["log_weight_decay"]).reshape(-1),
                torch.full((1 if c == 2 else c,), bias_decay, dtype=DT),
            ]
        )
        return logistic_hessian(Xt, w["weight"], w["bias"], decay)

    params0 = {"weight": torch.zeros(shape, dtype=DT), "bias": torch.zeros(() if c == 2 else (c,), dtype=DT)}
    return _finish(
        name,
        inner,
        outer,
        hessian,
        params0,
        hparams,
        n_train=len(yt),
        n_val=len(yv),
        source=source,
        batch_loss=batch,
    )


def logistic_hessian(X: Tensor, weight: Tensor, bias: Tensor, decay: Tensor) -> Tensor:
    """Dense Hessian of ``mean_i ℓ(x_iᵀW + b, y_i) + ½ Σ decay ⊙ [W, b]²`` (independent of ``y``).

    ``weight`` of shape ``(d,)`` means one logit and ``ℓ = softplus(−ỹz)``:
    ``H = X̃ᵀ diag(s(1−s)) X̃/n``, ``s = σ(z)``. Shape ``(d, C)`` means softmax cross-entropy:
    ``H = (1/n) Σ_i x̃_i x̃_iᵀ ⊗ (diag(π_i) − π_i π_iᵀ)``. ``X̃ = [X, 1]``; rows and columns in
    the flattening order of ``{"weight", "bias"}`` (row-major ``W``, then ``b``), plus
    ``diag(decay)`` (``decay`` in that order too).
    """
    with torch.no_grad():
        Xa = _augment(X)
        n = X.shape[0]
        z = X @ weight + bias
        if weight.dim() == 1:
            s = torch.sigmoid(z)
            return Xa.T @ (Xa * (s * (1 - s))[:, None]) / n + torch.diag(decay)
        c = weight.shape[1]
        pi = torch.softmax(z, dim=1)
        first = torch.einsum("ni,na,nj->iaj", Xa, pi, Xa) / n  # Σ x̃_i x̃_j π_a: block-diagonal in a
        m = Xa.shape[1]
        Hd = torch.zeros(m, c, m, c, dtype=X.dtype)
        idx = torch.arange(c)
        Hd[:, idx, :, idx] = first.permute(1, 0, 2)
        Q = (Xa[:, :, None] * pi[:, None, :]).reshape(n, m * c)  # rows x̃_i ⊗ π_i
        return Hd.reshape(m * c, m * c) - Q.T @ Q / n + torch.diag(decay)


def load_problem(
    name: str, *, n_train: int | None = None, decay: tuple[float, float] = (1e-3, 1e-1), seed: int = 0
) -> BilevelProblem:
    """One of :data:`PROBLEMS` by name (``n_train=None``: 300 for the sklearn sets, all of digits)."""
    if name == "diabetes":
        return diabetes_ridge(n_train=300 if n_train is None else n_train, decay=decay, seed=seed)
    if name == "breast-cancer":
        return logistic_problem(name, n_train=300 if n_train is None else n_train, decay=decay, seed=seed)
    if name == "digits":
        return logistic_problem(name, n_train=1078 if n_train is None else n_train, decay=decay, seed=seed)
    raise hg.HypergradientError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")


def cosine(a: Tree, b: Tree) -> float:
    """Cosine similarity ``⟨a, b⟩/(‖a‖‖b‖)``, defined as 0 when either is zero (no direction)."""
    na, nb = float(tree.norm(a)), float(tree.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(tree.dot(a, b)) / (na * nb)


def rel_dist(a: Tree, ref: Tree) -> float:
    """Relative L2 distance ``‖a − ref‖/‖ref‖``."""
    return float(tree.norm(tree.sub(a, ref))) / float(tree.norm(ref))
