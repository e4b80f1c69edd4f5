"""``python -m qbound.cli``: the same as the ``qbound`` command."""

import sys

from qbound.cli import main

sys.exit(main())
