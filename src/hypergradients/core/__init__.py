"""What a hypergradient is, with torch alone.

``dL_V/dλ = ∂L_V/∂λ − (∂F/∂λ)ᵀ p`` with ``(∂F/∂w)ᵀ p = ∂L_V/∂w`` at a solution of an optimality
condition ``F(w, λ) = 0`` (for trained weights, ``F = ∂L_T/∂w``): the implicit function theorem,
once (:mod:`.implicit`), for the conditions of :mod:`.conditions`, whose operators
(:mod:`.operators`) the methods of :mod:`.solvers` solve with the numerical kernels of
:mod:`.kernels`, following the protocol of :mod:`.method`. Around it: the dict-of-tensor algebra
(:mod:`.tree`), the only second-order autograd code (:mod:`.derivatives`), what a call reports
(:mod:`.info`) and carries to the next (:mod:`.state`), the two public doors
:func:`~.hypergradient.hypergradient` and :func:`~.roots.root_hypergradient`, and data-parallel
averaging (:mod:`.distributed`).

Nothing here imports from the rest of the package: the layers above (``paths``, ``hparams``,
``training``, ``app``) import from here, never the other way round.
"""
