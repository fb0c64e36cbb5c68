"""``python -m shapkern``: the command line (shapkern.cli)."""

import sys

from shapkern.cli import main

sys.exit(main())
