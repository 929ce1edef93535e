"""The command line (the ``cli`` extra): commands, the registered experiments, their settings
schema, datasets and corpora, reports, progress and figures.

The library's core never loads this package; it needs numpy, matplotlib and the other packages of
the ``cli`` extra (:mod:`.entry` checks for them before anything else is imported).
:mod:`hypergradients.data` is the public face of its datasets and corpora.
"""
