"""``python -m medad`` = the ``medad`` console script."""

from medad.cli import main

main()
