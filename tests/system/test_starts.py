"""Starts where PYTHONDONTWRITEBYTECODE=1 is set: the runtime install compiles, once, what the
server imports, so that no start compiles it again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

RUN_STAMP = ".venv/.runtime-installed"


def test_the_runtime_install_compiles_what_the_server_imports_with_bytecode_writing_on() -> None:
    """The runtime install skips byte-compiling (--no-compile), and with
    PYTHONDONTWRITEBYTECODE=1 nothing ever wrote what the server imports: every start compiled
    it again (12.5-15.7 s to readiness)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    plan = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", RUN_STAMP],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    precompile = [i for i, line in enumerate(plan) if "scripts/precompile.py" in line]
    install = [i for i, line in enumerate(plan) if "--no-build-isolation -e ." in line]
    assert precompile and install and install[-1] < precompile[0] < len(plan) - 1, plan
    assert plan[precompile[0]].startswith("env -u PYTHONDONTWRITEBYTECODE "), plan
    assert plan[-1] == f"touch {RUN_STAMP}"


def test_precompile_writes_what_a_start_and_its_warm_up_import(tmp_path: Path) -> None:
    """Into a pycache prefix here (the checkout's .venv stays as it is): the server, LiteLLM's
    modules the provider path uses, and the event loop."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPYCACHEPREFIX=str(tmp_path), LITELLM_LOCAL_MODEL_COST_MAP="True")
    done = subprocess.run(
        [sys.executable, "scripts/precompile.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.startswith("precompile: "), done.stdout + done.stderr
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pyc")}
    for module in (
        "ml_serving/api/server.",
        "ml_serving/generation/llm/gateway.",
        "litellm/main.",
        "litellm/llms/openai/chat/gpt_transformation.",
        "uvloop/__init__.",
    ):
        assert any(module in path for path in written), (module, len(written))


def test_precompile_refuses_to_run_with_bytecode_writing_off() -> None:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, "scripts/precompile.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "bytecode writing is off" in done.stderr
