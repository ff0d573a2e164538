"""`python -m ml_serving.scoring list|promote|shadow`: the file registry's command (scoring.cli)."""

from __future__ import annotations

import sys

from ml_serving.scoring.cli import main

if __name__ == "__main__":
    sys.exit(main())
