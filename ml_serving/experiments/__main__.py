"""`python -m ml_serving.experiments snapshot|evaluate|shares|assign`: experiments.cli."""

from __future__ import annotations

import logging
import sys

from ml_serving.experiments.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
