"""``python -m hapkit``: the hapkit command line (see :mod:`hapkit.cli`)."""

import sys

from hapkit.cli import main

if __name__ == "__main__":  # not when a worker process re-imports the main module
    sys.exit(main())
