"""ml-serving's own load generator and benchmark: `python -m bench` (see bench/RESULTS.md)."""
