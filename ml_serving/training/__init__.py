"""Offline tools: the interaction simulator and the training pipeline (never served)."""
