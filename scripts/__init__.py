"""Developer scripts: load, soak and before/after measurements (run as python -m scripts.NAME)."""
