"""The README's commands work as written: every grpcurl example against the default server, the
Python client example (with and without a bearer token), the train/promote commands on a copy of
the registry, and no sh block that needs the venv running a bare `python`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving.api import server
from ml_serving.config import REPO_FEATURES
from ml_serving.scoring.registry import ModelRegistry
from ml_serving.training.reproducibility import model_differences
from tests.support import REPO
from tests.support.servers import StartServer, make_settings

README = REPO / "README.md"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
TOKEN = "readme-example-token-0123456789"
_COMMAND = re.compile(
    r"\$G -plaintext(?: -d '(?P<data>[^']*)')? 127\.0\.0\.1:50051 (?P<call>[\w.]+/\w+)"
)


def readme_calls() -> list[tuple[str, str]]:
    """(call, JSON data) of every `$G -plaintext [-d '...'] 127.0.0.1:50051 Service/Method`."""
    text = README.read_text().replace("\\\n", " ")
    text = re.sub(r" {2,}", " ", text)
    return [(m["call"], m["data"] or "{}") for m in _COMMAND.finditer(text)]


def _types(call: str) -> tuple[type[Any], type[Any], bool]:
    service, _, method = call.rpartition("/")
    if service == "grpc.health.v1.Health":
        return health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, False
    assert service == "mlserving.v1.InferenceService", call
    descriptor = pb.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name[method]
    request = getattr(pb, descriptor.input_type.name)
    response = getattr(pb, descriptor.output_type.name)
    return request, response, descriptor.server_streaming


def test_the_readme_shows_every_method() -> None:
    methods = {call.rpartition("/")[2] for call, _ in readme_calls()}
    assert methods >= {"Check", "ListPromptVersions", "Generate", "GenerateStream"}


@pytest.fixture(scope="module")
async def default_app() -> AsyncIterator[server.App]:
    """A server on the README's defaults, the embedded feature store included (the tests'
    shared server leaves it off)."""
    running = await server.start(make_settings(feature_repo=REPO_FEATURES))
    await running.wait_ready()
    yield running
    await running.stop(0)


@pytest.mark.parametrize(("call", "data"), readme_calls(), ids=lambda v: str(v)[:40])
async def test_readme_example_succeeds(default_app: server.App, call: str, data: str) -> None:
    app = default_app
    request_type, response_type, streaming = _types(call)
    request = json_format.Parse(data, request_type())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        if streaming:
            stream = channel.unary_stream(
                f"/{call}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            replies = [reply async for reply in stream(request, timeout=30)]
            assert replies
        else:
            unary = channel.unary_unary(
                f"/{call}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            reply = await unary(request, timeout=30)
            assert json.loads(json_format.MessageToJson(reply))  # a non-empty answer


# --- the rest of the README's commands ------------------------------------------------------------


def section(title: str) -> str:
    """The README text under `## title`, up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    """Fenced blocks of one language, their common indentation removed (list items indent)."""
    blocks = []
    for indent, body in re.findall(rf"^( *)```{language}\n(.*?)^\1```", text, re.M | re.S):
        blocks.append("".join(line.removeprefix(indent) for line in body.splitlines(True)))
    return blocks


def _clean_env(**extra: str) -> dict[str, str]:
    # Nothing of this test process's settings or an enclosing make may leak into the commands.
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VERSION", "MODEL_ROOT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_SERVING_") and k not in drop}
    return {**env, **extra}


async def _run_python_example(port: int, tmp_path: Path, **env: str) -> tuple[int, str, str]:
    (example,) = code_blocks(section("Python client"), "python")
    assert example.count("127.0.0.1:50051") == 1
    script = tmp_path / "example.py"
    script.write_text(example.replace("127.0.0.1:50051", f"127.0.0.1:{port}"))
    # Run as the README says: the venv's python, from a directory outside the checkout.
    process = await asyncio.create_subprocess_exec(
        str(VENV_PYTHON),
        str(script),
        cwd=tmp_path,
        env=_clean_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _check_example_output(out: str) -> None:
    score_line, tip_line = out.splitlines()
    assert score_line.startswith("tips-ranker 1 [('tip-1', "), score_line
    assert "('tip-2', " in score_line
    version, decision_id, propensity, fallback, text = tip_line.split(" ", 4)
    assert (version, propensity, fallback) == ("v2-mentor", "1.0", "False")
    assert len(decision_id) == 32
    assert text.strip()


async def test_the_python_client_example_runs_as_written(app: server.App, tmp_path: Path) -> None:
    returncode, out, err = await _run_python_example(app.port, tmp_path)
    assert returncode == 0, err
    _check_example_output(out)


async def test_the_python_client_example_sends_the_bearer_token(
    start_server: StartServer, tmp_path: Path
) -> None:
    secured = await start_server(auth_token=TOKEN)
    returncode, out, err = await _run_python_example(
        secured.port, tmp_path, ML_SERVING_AUTH_TOKEN=TOKEN
    )
    assert returncode == 0, err
    _check_example_output(out)
    returncode, _, err = await _run_python_example(secured.port, tmp_path)
    assert returncode != 0
    assert "UNAUTHENTICATED" in err


def _scratch_checkout(tmp_path: Path) -> Path:
    """A directory where the README's make commands run verbatim without touching the shipped
    registry: the Makefile, its inputs and the venv linked in, models/ copied."""
    scratch = tmp_path / "checkout"
    scratch.mkdir()
    for name in (
        "Makefile",
        "requirements.lock",
        "requirements-dev.lock",
        "pyproject.toml",
        ".venv",
    ):
        (scratch / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "models", scratch / "models")
    # The Feast repository's definitions (not its data: `make train` writes the event tables).
    (scratch / "feature_repo").mkdir()
    for name in ("tips.py", "feature_store.yaml"):
        shutil.copy2(REPO / "feature_repo" / name, scratch / "feature_repo" / name)
    return scratch


def _sh(command: str, cwd: Path) -> str:
    done = subprocess.run(
        command, shell=True, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    return done.stdout


def test_the_train_and_promote_commands_run_as_written(tmp_path: Path) -> None:
    stale = subprocess.run(
        ["make", "-q", ".venv/.runtime-installed", ".venv/.dev-installed"],
        cwd=REPO,
        env=_clean_env(),
        timeout=30,
    )
    if stale.returncode != 0:
        # The scratch directory must never run the install recipe (`pip install -e .` there
        # would point the venv at it).
        pytest.skip("the runtime install is stale here; `make test` brings it up to date first")
    model = section("Model and prompts")
    block = code_blocks(model, "sh")[0]  # the first: train, list, promote
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make train", "make models", "make promote VERSION=N"]
    shipped = REPO / "models" / "tips-ranker"
    shipped_before = sorted(p.name for p in shipped.iterdir())
    served = (shipped / "PROMOTED").read_text().strip()
    scratch = _scratch_checkout(tmp_path)
    registry = scratch / "models" / "tips-ranker"

    trained = _sh(commands[0], scratch)
    assert (scratch / "feature_repo" / "data" / "impressions.parquet").exists()  # offline store
    (version,) = re.findall(r"^wrote models/tips-ranker/(\d+)$", trained, re.M)
    assert int(version) == max(int(p) for p in shipped_before if p.isdigit()) + 1
    assert (registry / "PROMOTED").read_text().strip() == served  # not promoted
    assert re.search(rf"^\* tips-ranker {served} ", _sh(commands[1], scratch), re.M)

    _sh(commands[2].replace("VERSION=N", f"VERSION={version}"), scratch)
    assert (registry / "PROMOTED").read_text().strip() == version
    assert re.search(rf"^\* tips-ranker {version} ", _sh(commands[1], scratch), re.M)
    # On unchanged code the new version reproduces the served one (weights and card, within
    # the tolerance of training/reproducibility.py: this may be another CPU than the shipped's).
    stored = ModelRegistry(scratch / "models")
    new, old = (stored.load("tips-ranker", v) for v in (version, served))
    assert model_differences(new, old) == []

    # The command `make promote` stands for, as the README spells it (run from the scratch
    # directory, so its relative `--root models` is the copy).
    (spelled,) = re.findall(r"`(\.venv/bin/python -m ml_serving\.scoring promote[^`]+)`", model)
    _sh(" ".join(spelled.split()).replace("--version N", f"--version {served}"), scratch)
    assert (registry / "PROMOTED").read_text().strip() == served
    assert sorted(p.name for p in shipped.iterdir()) == shipped_before
    assert (shipped / "PROMOTED").read_text().strip() == served


def test_promote_without_a_version_says_how() -> None:
    done = subprocess.run(
        ["make", "-o", ".venv/.runtime-installed", "promote"],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "usage: make promote VERSION=N" in done.stderr


def test_no_sh_block_runs_a_bare_python_module() -> None:
    # `python -m ml_serving...` outside the venv fails with "No module named 'grpc'": the
    # README's commands use .venv/bin/python or a make target.
    for block in code_blocks(README.read_text(), "sh"):
        for line in block.splitlines():
            assert not re.search(r"(^|[\s|;&(])python3?(\.\d+)? -m ", line), line
