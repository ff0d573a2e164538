"""The decision log: its lines, the keyed user hash, reading logs back, the snapshot command."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml_serving.experiments import bandit, cli
from ml_serving.experiments.assignment import Assignment, HowChosen
from ml_serving.experiments.decisions import (
    DECISIONS_LOGGER,
    DecisionLog,
    build_snapshot,
    read_decisions,
    read_rewards,
)
from ml_serving.observability.logs import JsonFormatter, RedactingFilter, TextFormatter

KEY = b"decision-log-test-key"
NAME = "tip-prompts"


def assignment(
    decision_id: str, version: str = "v2-mentor", how: HowChosen = HowChosen.EXPERIMENT
) -> Assignment:
    experiment = NAME if how is HowChosen.EXPERIMENT else None
    propensity = 0.25 if how is HowChosen.EXPERIMENT else 1.0
    return Assignment(decision_id, version, how, propensity, experiment)


def record(log: DecisionLog, a: Assignment, user: str = "alice@example.com") -> None:
    log.record(a, user_id=user, prompt_hash="ab" * 32, model="m", fallback=False, request_id="r")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 11
    completion_tokens: int = 7
    finish_reason: str = "stop"


@dataclass(frozen=True)
class Result:
    text: str = "Drink a glass of water."
    model: str = "m"
    prompt_version: str = "v3-few-shot"
    prompt_hash: str = "cd" * 32
    fallback: bool = False
    completion: Usage = Usage()


def test_a_primary_line_has_every_field_and_no_raw_user_id(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, KEY)
    record(log, assignment("a" * 32))
    log.close()
    text = path.read_text()
    assert "alice" not in text
    line = json.loads(text)
    assert set(line) == {
        "decision_id", "ts", "experiment", "version", "propensity", "how", "prompt_hash",
        "model", "fallback", "user", "shadow", "request_id",
    }  # fmt: skip
    assert line["decision_id"] == "a" * 32
    assert (line["experiment"], line["version"], line["propensity"], line["how"]) == (
        NAME,
        "v2-mentor",
        0.25,
        "experiment",
    )
    assert (line["prompt_hash"], line["model"], line["fallback"], line["shadow"]) == (
        "ab" * 32,
        "m",
        False,
        False,
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert line["user"] == log.user_hash("alice@example.com")
    assert re.fullmatch(r"[0-9a-f]{32}", line["user"])
    assert log.lines == 1


def test_the_user_hash_is_keyed_and_stable() -> None:
    a, b, other = DecisionLog(None, KEY), DecisionLog(None, KEY), DecisionLog(None, b"other")
    assert a.user_hash("u1") == b.user_hash("u1") != other.user_hash("u1")
    assert a.user_hash("u1") != a.user_hash("u2")
    with pytest.raises(ValueError, match="must not be empty"):
        DecisionLog(None, b"")
    long_key = DecisionLog(None, b"k" * 100)  # beyond blake2b's 64 bytes: hashed down
    assert long_key.user_hash("u1") != a.user_hash("u1")


def test_the_file_is_appended_across_writers(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    first, second = DecisionLog(path, KEY), DecisionLog(path, KEY)
    for i in range(50):
        record(first if i % 2 else second, assignment(f"{i:032x}"))
    first.close()
    second.close()
    third = DecisionLog(path, KEY)
    record(third, assignment("f" * 32))
    third.close()
    ids = [json.loads(line)["decision_id"] for line in path.read_text().splitlines()]
    assert ids == [f"{i:032x}" for i in range(50)] + ["f" * 32]


def test_reopen_follows_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, KEY)
    record(log, assignment("1" * 32))
    path.rename(tmp_path / "decisions.jsonl.1")
    log.reopen()
    record(log, assignment("2" * 32))
    log.close()
    assert json.loads(path.read_text())["decision_id"] == "2" * 32
    assert json.loads((tmp_path / "decisions.jsonl.1").read_text())["decision_id"] == "1" * 32


def test_a_failed_write_is_counted_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    log = DecisionLog("/dev/full", KEY)  # every write fails with ENOSPC
    with caplog.at_level(logging.WARNING):
        record(log, assignment("a" * 32))
    log.close()
    assert (log.write_errors, log.lines) == (1, 0)
    assert "a line was lost" in caplog.text


def test_without_a_path_lines_go_to_the_decisions_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = DecisionLog(None, KEY)
    with caplog.at_level(logging.INFO, logger=DECISIONS_LOGGER):
        record(log, assignment("a" * 32))
        log.record_shadow(
            "a" * 32, experiment=NAME, version="v3", outcome="ran", seconds=0.5, result=Result()
        )
    # The record's fields are the line's fields; its message only says what it is.
    assert [r.getMessage() for r in caplog.records] == ["decision", "shadow decision"]
    primary, shadow = (vars(r) for r in caplog.records)
    assert primary["decision_id"] == shadow["decision_id"] == "a" * 32
    assert (primary["version"], primary["propensity"], primary["shadow"]) == (
        "v2-mentor",
        0.25,
        False,
    )
    # A completion reaches the ordinary log only at DEBUG.
    assert "text" not in shadow and shadow["usage"] == {"prompt_tokens": 11, "completion_tokens": 7}
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=DECISIONS_LOGGER):
        log.record_shadow(
            "a" * 32, experiment=NAME, version="v3", outcome="ran", seconds=0.5, result=Result()
        )
    assert vars(caplog.records[0])["text"] == "Drink a glass of water."


def test_a_json_log_line_carries_the_decision_at_its_top_level(tmp_path: Path) -> None:
    # Through the formatter and filters the server installs (logs.configure): one parse of the
    # log line gives every field of the decision, with no JSON string inside msg.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter())
    decisions_logger = logging.getLogger(DECISIONS_LOGGER)
    decisions_logger.addHandler(handler)
    old_level = decisions_logger.level
    decisions_logger.setLevel(logging.INFO)
    try:
        log = DecisionLog(None, KEY)
        record(log, assignment("a" * 32))
        log.record_shadow(
            "a" * 32, experiment=NAME, version="v3", outcome="ran", seconds=0.5, result=Result()
        )
    finally:
        decisions_logger.removeHandler(handler)
        decisions_logger.setLevel(old_level)
    raw = tmp_path / "raw.jsonl"
    file_log = DecisionLog(raw, KEY)
    record(file_log, assignment("a" * 32))
    file_log.close()
    primary, shadow = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (primary["logger"], primary["level"], primary["msg"]) == (
        DECISIONS_LOGGER,
        "INFO",
        "decision",
    )
    # Every field of the file's line, with the same values (its own ts and request id).
    expected = json.loads(raw.read_text())
    assert {k: primary[k] for k in expected if k != "ts"} == {
        k: v for k, v in expected.items() if k != "ts"
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", primary["ts"])
    assert shadow["msg"] == "shadow decision" and shadow["usage"]["completion_tokens"] == 7
    log_file = tmp_path / "server.log"
    log_file.write_text(stream.getvalue())
    read = read_decisions([log_file])
    assert list(read.decisions) == ["a" * 32] and read.shadow_lines == 1
    assert read.decisions["a" * 32].propensity == 0.25


def test_a_text_log_line_carries_the_decision_after_the_message() -> None:
    log = DecisionLog(None, KEY)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, r: logging.LogRecord) -> None:
            records.append(r)

    keep = Keep()
    decisions_logger = logging.getLogger(DECISIONS_LOGGER)
    decisions_logger.addHandler(keep)
    old_level = decisions_logger.level
    decisions_logger.setLevel(logging.INFO)
    try:
        record(log, assignment("b" * 32))
    finally:
        decisions_logger.removeHandler(keep)
        decisions_logger.setLevel(old_level)
    text = TextFormatter().format(records[0])
    head, _, fields = text.partition(" {")
    assert head.endswith("INFO ml_serving.decisions: decision")
    assert json.loads("{" + fields)["decision_id"] == "b" * 32
    # Other records' text lines are unchanged.
    other = logging.makeLogRecord({"name": "x", "msg": "m", "levelno": 20, "levelname": "INFO"})
    assert TextFormatter().format(other).endswith("INFO x: m")


def test_a_shadow_line_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, KEY, max_text_chars=5)
    log.record_shadow(
        "b" * 32, experiment=NAME, version="v3-few-shot", outcome="ran", seconds=1.25,
        result=Result(),
    )  # fmt: skip
    log.record_shadow(
        "c" * 32, experiment=NAME, version="v3-few-shot", outcome="failed", seconds=2,
        error="TimeoutError: the shadow ran past its timeout_s",
    )  # fmt: skip
    log.close()
    ran, failed = (json.loads(line) for line in path.read_text().splitlines())
    assert ran["shadow"] is True and ran["outcome"] == "ran"
    assert (ran["text"], ran["model"], ran["prompt_hash"], ran["finish_reason"]) == (
        "Drink",
        "m",
        "cd" * 32,
        "stop",
    )
    assert ran["usage"] == {"prompt_tokens": 11, "completion_tokens": 7}
    assert ran["seconds"] == 1.25 and ran["error"] is None
    assert failed["outcome"] == "failed" and "timeout_s" in failed["error"]
    assert "text" not in failed


def test_read_decisions_takes_raw_json_log_and_text_log_lines(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    log = DecisionLog(raw, KEY)
    record(log, assignment("1" * 32))
    record(log, assignment("1" * 32))  # the same decision twice (a retried shipment)
    log.record_shadow("1" * 32, experiment=NAME, version="v3", outcome="ran", seconds=0)
    log.close()
    # The line as the message of a JSON log line (how the logger wrote it before its fields
    # moved to the top level), beside other loggers' lines.
    line = raw.read_text().splitlines()[0].replace("1" * 32, "2" * 32)
    formatter = JsonFormatter()
    json_log = tmp_path / "server.log"
    json_log.write_text(
        "\n".join(
            formatter.format(logging.makeLogRecord({"name": n, "msg": m, "levelno": 20}))
            for n, m in [
                (DECISIONS_LOGGER, line),
                ("ml_serving.api.rpc", "access"),
                ("other", '{"decision_id": "x"}'),
            ]
        )
        + "\n"
    )
    text_log = tmp_path / "text.log"
    text_log.write_text(
        "2024-05-01 12:00:00 INFO ml_serving.decisions: "
        + line.replace("2" * 32, "3" * 32)
        + "\nnot a decision\n"
        + '{"decision_id": "4", "version": "v1", "how": "experiment", "propensity": 0}\n'
    )
    read = read_decisions([raw, json_log, text_log])
    assert sorted(read.decisions) == ["1" * 32, "2" * 32, "3" * 32]
    assert read.decisions["2" * 32].version == "v2-mentor"
    assert read.decisions["2" * 32].user == DecisionLog(None, KEY).user_hash("alice@example.com")
    assert (read.duplicates, read.shadow_lines, read.malformed) == (1, 1, 1)
    assert read.skipped_lines == 3


def test_read_rewards(tmp_path: Path) -> None:
    path = tmp_path / "rewards.csv"
    path.write_text("decision_id,reward\na,1\nb,0\n\na,0\nc,0.5\n")
    read = read_rewards([path])
    assert read.rewards == {"a": 1.0, "b": 0.0, "c": 0.5}
    assert read.duplicates == 1
    no_header = tmp_path / "plain.csv"
    no_header.write_text("a,1\n")
    assert read_rewards([no_header]).rewards == {"a": 1.0}


@pytest.mark.parametrize(
    ("text", "problem"),
    [("a\n", "expected decision_id,reward"), ("a,yes\n", "not a number"), ("a,inf\n", "finite")],
)
def test_a_bad_reward_row_names_its_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "rewards.csv"
    path.write_text("decision_id,reward\n" + text)
    with pytest.raises(ValueError, match=f"rewards.csv:2: .*{problem}"):
        read_rewards([path])


def logged(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, KEY)
    for i in range(10):
        record(log, assignment(f"e{i}", "v1" if i < 6 else "v2-mentor"))
    record(log, assignment("e0", "v1"))  # a duplicate line: counted once
    record(log, assignment("r0", "v1", HowChosen.REQUEST))  # chosen by the request
    record(log, assignment("d0", "v1", HowChosen.DEFAULT))
    log.close()
    rewards = tmp_path / "rewards.csv"
    rewards.write_text("decision_id,reward\ne0,1\ne1,1\ne1,1\ne2,0\ne6,1\nr0,1\nghost,1\n")
    return path, rewards


def test_build_snapshot_counts_each_decision_once(tmp_path: Path) -> None:
    decisions, rewards = logged(tmp_path)
    as_of = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    snap, report = build_snapshot(
        read_decisions([decisions]), read_rewards([rewards]), experiment=None, as_of=as_of
    )
    assert snap == bandit.Snapshot(
        NAME, as_of, {"v1": bandit.Arm(6, 2), "v2-mentor": bandit.Arm(4, 1)}
    )
    assert (report.decisions, report.rewarded) == (10, 4)
    assert (report.duplicate_decisions, report.duplicate_rewards) == (1, 1)
    assert report.unmatched_rewards == ("ghost",)
    assert report.uncounted_rewards == 1  # r0: chosen by the request, not the experiment


def test_the_snapshot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    decisions, rewards = logged(tmp_path)
    out = tmp_path / "rewards" / "snapshot.json"
    argv = ["snapshot", "--decisions", str(decisions), "--rewards", str(rewards)]
    code = cli.main([*argv, "--as-of", "2024-05-01T12:00:00Z", "--out", str(out)])
    assert code == 0
    snap = bandit.read_snapshot(out)
    assert snap.experiment == NAME
    assert snap.arms == {"v1": bandit.Arm(6, 2), "v2-mentor": bandit.Arm(4, 1)}
    err = capsys.readouterr().err
    assert "10 decisions counted" in err
    assert "1 rewards match no decision: ghost" in err
    assert "duplicates ignored: 1 decision lines, 1 reward rows" in err
    # To stdout by default; a name the log does not hold counts nothing.
    assert cli.main([*argv, "--experiment", "other"]) == 0
    assert json.loads(capsys.readouterr().out)["arms"] == {}


def test_the_snapshot_command_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    decisions, _ = logged(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("e0,lots\n")
    assert cli.main(["snapshot", "--decisions", str(decisions), "--rewards", str(bad)]) == 2
    assert "bad.csv:1: reward 'lots' is not a number" in capsys.readouterr().err
    missing = str(tmp_path / "missing.jsonl")
    assert cli.main(["snapshot", "--decisions", missing, "--rewards", str(bad)]) == 2
    assert "No such file" in capsys.readouterr().err


def test_the_snapshot_command_takes_name_and_path_from_the_experiments_file(
    tmp_path: Path,
) -> None:
    decisions, rewards = logged(tmp_path)
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(
        "experiments:\n  - name: tip-prompts\n    variants: [v1, v2-mentor]\n"
        "    policy: thompson\n    snapshot: snaps/tip.json\n"
    )
    argv = ["snapshot", "--decisions", str(decisions), "--rewards", str(rewards)]
    assert cli.main([*argv, "--experiments", str(experiments)]) == 0
    assert bandit.read_snapshot(tmp_path / "snaps" / "tip.json").arms["v1"] == bandit.Arm(6, 2)
