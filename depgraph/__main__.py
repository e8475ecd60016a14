"""``python -m depgraph``: the same command line as the ``depgraph`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
