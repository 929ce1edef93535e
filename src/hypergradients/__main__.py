"""``python -m hypergradients`` is the ``hypergradients`` command."""

import sys

from .cli import main

sys.exit(main())
