"""scripts/score_ab.py, the paired before/after CPU measurement, on a tiny load: it runs, counts
calls on both servers and prints its summary (this checkout against itself; no timing asserted)."""

from __future__ import annotations

import re

import pytest

from scripts import score_ab
from tests.support import REPO


def test_score_ab_runs_both_checkouts_and_reports_paired_differences(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [str(REPO), str(REPO), "--rounds", "2", "--seconds", "0.5", "--concurrency", "2"]
    assert score_ab.main(args) == 0
    out = capsys.readouterr().out
    rounds = re.findall(r"^round \d: A +(\d+) calls.*\| B +(\d+) calls", out, re.M)
    assert len(rounds) == 2
    assert all(int(a) > 0 and int(b) > 0 for a, b in rounds)
    assert re.search(r"^main +CPU µs/call: A median +\d+, B - A median", out, re.M)
    assert re.search(r"^process +CPU µs/call: .*in \d of 2 rounds$", out, re.M)
