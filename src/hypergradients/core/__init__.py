"""What a hypergradient is, with torch alone.

``dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) p`` with ``H p = ∂L_V/∂w`` at the trained weights: the
dict-of-tensor algebra (:mod:`.tree`), the only second-order autograd code (:mod:`.derivatives`),
the linear operators it defines (:mod:`.operators`), the method protocol (:mod:`.method`), the
inverse-Hessian methods (:mod:`.solvers`) and the numerical kernels behind them (:mod:`.kernels`),
their carried state (:mod:`.state`), the two public doors :func:`~.hypergradient.hypergradient`
and :func:`~.roots.root_hypergradient`, and data-parallel averaging (:mod:`.distributed`).

Nothing here imports from the rest of the package: the layers above (``paths``, ``hparams``,
``training``, ``app``) import from here, never the other way round.
"""
