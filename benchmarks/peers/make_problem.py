"""Generate the hypergradient benchmark problem (numpy only; runs with any Python that has numpy).

Per-feature-L2 binary logistic regression::

    L_T(w, log_lam) = mean(BCEWithLogits(X_train w, y_train)) + 0.5 * sum_i exp(log_lam_i) w_i^2
    L_V(w)          = mean(BCEWithLogits(X_val w, y_val))

The npz (all float64) holds ``X_train, y_train, X_val, y_val, w_star, log_lam, alpha`` plus:

* ``exact_hypergradient``: dL_V/dlog_lam at w_star from a dense solve, ``-(lam * w_star) * H^{-1} v``
  with ``v = dL_V/dw`` and H the (dense) Hessian of L_T in w.
* ``cg{K}_hypergradient`` / ``neumann{K}_hypergradient`` for every K in ``--ref-iters``: the same formula
  with ``H^{-1} v`` replaced by K textbook CG iterations from p=0 (K Hessian-vector products, no early
  stop), resp. the K-term Neumann sum ``alpha * sum_{j<K} (I - alpha H)^j v``. K unrolled gradient steps
  from w_star (step alpha) give the K-term Neumann sum too (w stays at w_star), so
  ``neumann{K}_hypergradient`` is also the reference for ``unrolled`` with K steps. These per-algorithm
  references tell a wrong library (bug) apart from an approximation that has not converged.
* ``alpha = 1 / lambda_max(H)``, and for information ``lambda_min``, ``lambda_max``, ``grad_norm``.

    python benchmarks/peers/make_problem.py --out problem.npz            # d=1000, 3000 train, 1000 val
    python benchmarks/peers/make_problem.py --d 50 --n-train 200 --n-val 100 --out small.npz
"""

from __future__ import annotations

import argparse

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _bce(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def inner_loss(w: np.ndarray, X: np.ndarray, y: np.ndarray, lam: np.ndarray) -> float:
    return _bce(X @ w, y) + 0.5 * float(np.sum(lam * w * w))


def inner_grad(w: np.ndarray, X: np.ndarray, y: np.ndarray, lam: np.ndarray) -> np.ndarray:
    return X.T @ (_sigmoid(X @ w) - y) / X.shape[0] + lam * w


def inner_hessian(w: np.ndarray, X: np.ndarray, lam: np.ndarray) -> np.ndarray:
    s = _sigmoid(X @ w)
    H = (X * (s * (1.0 - s))[:, None]).T @ X / X.shape[0]
    H[np.diag_indices_from(H)] += lam
    return 0.5 * (H + H.T)


def newton(X: np.ndarray, y: np.ndarray, lam: np.ndarray, tol: float, max_iter: int = 100) -> np.ndarray:
    """Damped Newton's method (backtracking on L_T) until ||grad L_T|| < tol."""
    w = np.zeros(X.shape[1])
    for _ in range(max_iter):
        g = inner_grad(w, X, y, lam)
        if np.linalg.norm(g) < tol:
            return w
        step = np.linalg.solve(inner_hessian(w, X, lam), g)
        f0, t = inner_loss(w, X, y, lam), 1.0
        while t > 1e-8 and inner_loss(w - t * step, X, y, lam) > f0 - 1e-4 * t * float(g @ step):
            t *= 0.5
        if t <= 1e-8:  # rounding floor reached: a full step is as good as it gets
            t = 1.0
        w = w - t * step
    g = inner_grad(w, X, y, lam)
    if np.linalg.norm(g) >= tol:
        raise RuntimeError(f"Newton did not reach ||g|| < {tol:g} (got {np.linalg.norm(g):.3e})")
    return w


def cg_solve(H: np.ndarray, b: np.ndarray, iters: int) -> np.ndarray:
    """Textbook CG from x=0: ``iters`` iterations, each one product with H; no early stop."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = float(r @ r)
    for _ in range(iters):
        if rs == 0.0:
            break
        Hp = H @ p
        a = rs / float(p @ Hp)
        x += a * p
        r -= a * Hp
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def neumann_solve(H: np.ndarray, b: np.ndarray, iters: int, alpha: float) -> np.ndarray:
    """``alpha * sum_{j=0}^{iters-1} (I - alpha H)^j b`` (iters terms, iters-1 products with H)."""
    term = b.copy()
    acc = b.copy()
    for _ in range(iters - 1):
        term = term - alpha * (H @ term)
        acc += term
    return alpha * acc


def make(
    d: int,
    n_train: int,
    n_val: int,
    seed: int,
    density: float,
    noise: float,
    tol: float,
    ref_iters: list[int],
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    X = rng.standard_normal((n, d))
    k = max(1, round(density * d))
    w_true = np.zeros(d)
    support = rng.choice(d, size=k, replace=False)
    w_true[support] = rng.standard_normal(k) * (3.0 / np.sqrt(k))  # logits have std ~3
    y = (rng.random(n) < _sigmoid(X @ w_true)).astype(np.float64)
    flip = rng.random(n) < noise
    y[flip] = 1.0 - y[flip]
    X_train, y_train, X_val, y_val = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    log_lam = np.log(1e-2) + 0.5 * rng.standard_normal(d)
    lam = np.exp(log_lam)

    w_star = newton(X_train, y_train, lam, tol)
    H = inner_hessian(w_star, X_train, lam)
    eig = np.linalg.eigvalsh(H)
    alpha = 1.0 / eig[-1]
    v = X_val.T @ (_sigmoid(X_val @ w_star) - y_val) / n_val
    mixed = lam * w_star  # d^2 L_T / dlog_lam dw is diag(lam * w_star)

    out = {
        "X_train": X_train,
        "y_train": y_train,
        "X_val": X_val,
        "y_val": y_val,
        "w_star": w_star,
        "log_lam": log_lam,
        "alpha": np.float64(alpha),
        "exact_hypergradient": -mixed * np.linalg.solve(H, v),
        "lambda_min": np.float64(eig[0]),
        "lambda_max": np.float64(eig[-1]),
        "grad_norm": np.float64(np.linalg.norm(inner_grad(w_star, X_train, y_train, lam))),
        "seed": np.float64(seed),
    }
    for K in ref_iters:
        out[f"cg{K}_hypergradient"] = -mixed * cg_solve(H, v, K)
        out[f"neumann{K}_hypergradient"] = -mixed * neumann_solve(H, v, K, alpha)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output .npz path")
    ap.add_argument("--d", type=int, default=1000, help="number of features (= hyperparameters)")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--density", type=float, default=0.1, help="fraction of non-zero true weights")
    ap.add_argument("--noise", type=float, default=0.05, help="label-flip probability")
    ap.add_argument("--tol", type=float, default=1e-12, help="Newton stop: ||grad L_T(w_star)|| < tol")
    ap.add_argument(
        "--ref-iters", default="20,100", help="comma list of K for the cg{K}/neumann{K} references"
    )
    args = ap.parse_args(argv)
    ref_iters = [int(k) for k in args.ref_iters.split(",") if k.strip()]
    prob = make(args.d, args.n_train, args.n_val, args.seed, args.density, args.noise, args.tol, ref_iters)
    np.savez(args.out, **prob)
    cond = float(prob["lambda_max"] / prob["lambda_min"])
    print(
        f"wrote {args.out}: d={args.d} n_train={args.n_train} n_val={args.n_val} "
        f"|grad|={float(prob['grad_norm']):.2e} alpha={float(prob['alpha']):.4g} cond(H)={cond:.1f} "
        f"|exact hypergradient|={np.linalg.norm(prob['exact_hypergradient']):.3e}"
    )


if __name__ == "__main__":
    main()
