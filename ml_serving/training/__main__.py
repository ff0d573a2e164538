"""`python -m ml_serving.training`: train a model version from the simulator (training.train)."""

from __future__ import annotations

import sys

from ml_serving.training.train import main

if __name__ == "__main__":
    sys.exit(main())
