"""``python -m engm_fast <command>``: the same as the ``engm-fast`` console script."""
import sys

from engm_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
