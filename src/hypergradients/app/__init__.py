"""The command line (the ``cli`` extra): commands, the registered experiments, their settings
schema, datasets and corpora, reports, progress and figures.

A user of the library never loads this package; it needs numpy, matplotlib and the other packages
of the ``cli`` extra (:mod:`.entry` checks for them before anything else is imported).
"""
