"""Training with hyperparameters tuned on the way: the hyper step of Algorithm 1 for any loop
(:class:`~.hyper.HyperOptimizer`), the closed loop with checkpoints (:func:`~.fit.fit`), their
settings and defaults (:mod:`.settings`), the callbacks of ``fit`` (:mod:`.callbacks`), atomic
files and safe loads (:mod:`.files`), the tuned values in a plain file and back (:mod:`.export`), a
fresh model trained with them fixed (:mod:`.retrain`), minibatch streams (:mod:`.stream`), the
PyTorch Lightning callback (:mod:`.lightning`, the ``lightning`` extra) and the Hugging Face
``Trainer`` callback (:mod:`.hf`, the ``hf`` extra). Torch only (but for those two extras); built on
the families and the rule that composes them (:mod:`hypergradients.hparams`), the path tuner
(:mod:`hypergradients.paths.tuner`) and the core.
"""
