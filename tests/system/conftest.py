"""Whole-program tests: server subprocesses (drain, workers, stress), the README's commands,
deploy manifests, the bench and A/B tools. Every subprocess is bounded in time and stopped."""
