"""``python -m gateify``: the ``gateify`` command (see :mod:`gateify.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
