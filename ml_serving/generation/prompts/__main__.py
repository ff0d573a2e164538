"""`python -m ml_serving.generation.prompts check|lock`: the prompt lock file's command."""

from __future__ import annotations

import sys

from ml_serving.generation.prompts.registry import main

if __name__ == "__main__":
    sys.exit(main())
