"""Fakes and builders shared by the tests, bench/ and scripts/: never a test module itself."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The checkout's root (models/, bench/, deploy/, README.md)."""
