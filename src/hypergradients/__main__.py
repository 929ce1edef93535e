"""``python -m hypergradients`` is the ``hypergradients`` command (with its check for the ``cli`` extra)."""

import sys

from .app.entry import main

sys.exit(main())
