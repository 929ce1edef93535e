"""Hypergradients through the optimization path: unrolled (reverse mode, truncated, checkpointed)
and forward-mode differentiation of K inner optimizer steps.

:mod:`.optim` holds the differentiable inner optimizers as ``(init, update)`` pairs (``hg.optim``),
:mod:`.unroll` the two differentiation modes, :mod:`.methods` the method objects
:class:`~.methods.Unrolled` and :class:`~.methods.Forward`, and :mod:`.tuner` the truncated
hypergradient of an optimizer's own hyperparameters while training (``fit(path_hparams=...)``).
Built on :mod:`hypergradients.core`.
"""
