"""``python -m reweighting``: the command line (as the ``reweighting`` script)."""

import sys

from reweighting.cli import main

sys.exit(main())
