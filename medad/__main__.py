"""``python -m medad`` = the ``medad`` console script."""

import sys

from medad.cli import main

sys.exit(main())
