"""The Makefile as the README uses it: every target listed, `make run` runtime-only, stamps npm
cannot delete, the dev lock a superset of the runtime lock, the packed TypeScript client ignored."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from functools import cache

import pytest

from tests.support import REPO

README = REPO / "README.md"
RUN_STAMP = ".venv/.runtime-installed"
DEV_STAMP = ".venv/.dev-installed"


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`make ARGS` in the checkout, free of an enclosing make's flags (pytest under make test)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VERSION", "MODEL_ROOT"}
    }
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


@cache
def rules() -> dict[str, list[str]]:
    """Every explicit rule in make's database (`make -pn`): target -> its recipe lines."""
    database = make("-p", "-n", "-R", "help").stdout
    found: dict[str, list[str]] = {}
    target = None
    for line in database.splitlines():
        if line.startswith("\t") and target is not None:
            found[target].append(line[1:])
        elif (match := re.match(r"^([^\s#%:=][^:=]*):(?!=)", line)) and "#" not in line:
            target = match[1].strip()
            found.setdefault(target, [])
        elif not line.strip() or line.startswith("#"):
            target = None if not line.strip() else target
    return found


def _help_rows() -> list[tuple[str, str]]:
    out = make("help").stdout
    return [(m[1], m[2]) for m in re.finditer(r"^  (\S+)\s+(.+)$", out, re.M)]


def declared_phony() -> set[str]:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^\.PHONY:(.*)$", text, re.M)
    return set(line.split())


def test_make_help_lists_every_target() -> None:
    listed = {name for name, _ in _help_rows()}
    written = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    assert written, "no targets parsed"
    assert listed == written == declared_phony()
    assert {"run", "test", "test-py", "test-ts", "train", "promote", "install"} <= listed


def readme_make_commands() -> list[list[str]]:
    """The targets of every `make ...` in the README's sh blocks and inline code."""
    text = README.read_text()
    lines = [
        line.split("#")[0]
        for block in re.findall(r"^ *```sh\n(.*?)^ *```", text, re.M | re.S)
        for line in block.splitlines()
    ]
    lines += re.findall(r"`(make [^`]+)`", text)
    # Split as the shell does: ARGS="--seed 1" is one variable assignment, not targets.
    return [
        [word for word in shlex.split(line)[1:] if "=" not in word]
        for line in (line.strip() for line in lines)
        if line.startswith("make ")
    ]


def test_every_make_command_in_the_readme_is_a_target() -> None:
    listed = {name for name, _ in _help_rows()}
    commands = readme_make_commands()
    assert ["run"] in commands and ["promote"] in commands
    named = {target for command in commands for target in command}
    assert named <= listed, named - listed


def test_make_run_installs_the_runtime_lock_only_and_no_node() -> None:
    # -B: as on a fresh clone, every prerequisite is remade; -n prints the recipes unrun.
    plan = make("-n", "-B", "run").stdout
    assert "-r requirements.lock" in plan
    assert "-r requirements-dev.lock" not in plan  # only its setuptools pin is read (awk)
    assert "npm" not in plan
    assert plan.rstrip().endswith(".venv/bin/python -m ml_serving")


def test_the_dev_install_renews_the_runtime_stamp() -> None:
    plan = make("-n", "-B", DEV_STAMP).stdout.splitlines()
    assert any("-r requirements-dev.lock" in line for line in plan)
    assert f"touch {DEV_STAMP} {RUN_STAMP}" in plan


def test_after_an_install_make_run_installs_nothing() -> None:
    if make("-q", DEV_STAMP, check=False).returncode != 0:
        pytest.skip("the dev install is stale here; `make test` brings it up to date first")
    assert make("-n", "run").stdout.strip() == ".venv/bin/python -m ml_serving"


def test_no_stamp_lives_where_npm_ci_deletes_without_rewriting_it() -> None:
    # npm ci empties node_modules, then writes node_modules/.package-lock.json last: a stamp
    # anywhere else under node_modules would be deleted by the TypeScript README's `npm ci`.
    npm_targets = {t for t, recipe in rules().items() if any("npm ci" in r for r in recipe)}
    assert npm_targets == {
        "node_modules/.package-lock.json",
        "clients/typescript/node_modules/.package-lock.json",
    }
    for target, recipe in rules().items():
        if any("$(PIP)" in r or "pip install" in r for r in recipe):
            assert target.startswith(".venv/"), target


def _requirements(path: str) -> dict[str, str]:
    """name==version -> the requirement with its hashes, `# via` comments dropped."""
    text = (REPO / path).read_text()
    blocks: dict[str, str] = {}
    for block in re.findall(r"^([A-Za-z0-9][^\s]*==\S+(?: \\\n\s+--hash=\S+)+)", text, re.M):
        pin = block.split()[0].lower()
        blocks[pin] = " ".join(sorted(re.findall(r"--hash=(\S+)", block)))
    return blocks


def test_the_dev_lock_holds_every_runtime_pin_with_its_hashes() -> None:
    # What lets the dev install renew the runtime stamp: same versions, same artefacts.
    runtime, dev = _requirements("requirements.lock"), _requirements("requirements-dev.lock")
    assert len(runtime) > 20
    assert "setuptools==" in " ".join(dev)  # the build backend the runtime install borrows
    missing = {pin for pin in runtime if pin not in dev}
    assert not missing
    assert {pin: runtime[pin] for pin in runtime} == {pin: dev[pin] for pin in runtime}


def test_the_packed_typescript_client_is_ignored_by_git() -> None:
    client = REPO / "clients" / "typescript"
    package = json.loads((client / "package.json").read_text())
    # npm pack's file name: the scope's "@" dropped, "/" turned into "-".
    tarball = f"{package['name'].lstrip('@').replace('/', '-')}-{package['version']}.tgz"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"clients/typescript/{tarball}"], cwd=REPO, timeout=30
    )
    assert ignored.returncode == 0, f"{tarball} would be left untracked by npm pack"


def test_make_lock_runs_the_commands_the_lock_files_record() -> None:
    recipe = make("-n", "lock").stdout.splitlines()
    for path in ("requirements.lock", "requirements-dev.lock"):
        header = (REPO / path).read_text().splitlines()[1].removeprefix("#").strip()
        assert header in recipe, f"{path} was made by `{header}`, make lock runs {recipe}"
