"""Sub-commands of the ``hypergradients`` CLI: one module each, see :mod:`hypergradients.app.cli`."""
