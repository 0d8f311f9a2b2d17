"""``python -m fsmooth``: the same as the ``fsmooth`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
