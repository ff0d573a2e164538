"""The split topology (ML_SERVING_GENERATE_PORT): a supervisor, the main port's process serving
every method and the Generate port's serving Generate only, at a lower priority on every thread;
restarts keep the role, SIGTERM drains both, and no worker outlives the supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bench.procs import descendants, stat_fields
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import rpc, workers
from ml_serving.config import Settings
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, generate_stream_request, score_request
from tests.support.server_process import ServerProcess, free_port
from tests.support.servers import health_stub, write_llm_config
from tests.support.streams import collect

GRACE_S = 6.0
_NICE = 16
"""Index of the niceness in `stat_fields` (field 19 of /proc/<pid>/task/<tid>/stat)."""


def _settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[arg-type,call-arg]


def test_worker_env_puts_the_generate_workers_on_their_port_after_the_main_ones() -> None:
    settings = _settings(
        port=50051, generate_port=50052, workers=2, generate_workers=2, metrics_port=9090
    )
    assert workers.worker_count(settings) == 4
    base = {"PATH": "/bin", "ML_SERVING_GENERATE_PORT": "50052", "ML_SERVING_PORT": "50051"}
    envs = [workers.worker_env(settings, k, base) for k in range(4)]
    assert [e["ML_SERVING_PORT"] for e in envs] == ["50051", "50051", "50052", "50052"]
    assert [e["ML_SERVING_GENERATE_ONLY"] for e in envs] == ["false", "false", "true", "true"]
    assert [e["ML_SERVING_METRICS_PORT"] for e in envs] == ["9090", "9091", "9092", "9093"]
    for env in envs:  # no worker supervises in turn
        assert env["ML_SERVING_GENERATE_PORT"] == "0" and env["ML_SERVING_WORKERS"] == "1"
        assert env["ML_SERVING_REUSE_PORT"] == "true" and env["PATH"] == "/bin"
    # Generate-only workers sharing a port under this supervisor keep their role.
    generate_only = _settings(port=50052, workers=2, generate_only=True)
    assert workers.worker_env(generate_only, 1, {})["ML_SERVING_GENERATE_ONLY"] == "true"
    # One process per port: nobody else may bind it by mistake.
    single = _settings(port=50051, generate_port=50052)
    assert [workers.worker_env(single, k, {})["ML_SERVING_REUSE_PORT"] for k in (0, 1)] == [
        "false",
        "false",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 0}, "needs a fixed ML_SERVING_PORT"),
        ({"port": 50051, "generate_port": 50051}, "must differ from ML_SERVING_PORT"),
        ({"port": 50051, "generate_only": True}, "ML_SERVING_GENERATE_ONLY is for"),
        (
            {"port": 50051, "metrics_port": 65535, "generate_workers": 2},
            "ML_SERVING_GENERATE_WORKERS - 1 exceeds 65535",
        ),
    ],
)
def test_generate_port_settings_that_cannot_work_are_refused(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(**{"generate_port": 50052, **overrides})


# --- the real thing ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return stat_fields(f"/proc/{pid}/stat")[0] != "Z"
    except OSError:
        return False


def _free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _thread_niceness(pid: int) -> set[int]:
    tasks = Path(f"/proc/{pid}/task")
    return {int(stat_fields(str(task / "stat"))[_NICE]) for task in tasks.iterdir()}


def _thread_policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()}


def _is_generate_worker(pid: int) -> bool:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return b"ML_SERVING_GENERATE_ONLY=true" in environ


def _workers(proc: ServerProcess, count: int = 2) -> tuple[int, int]:
    """(main port's pid, Generate port's pid), once both have started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = descendants(proc.pid)
        if len(pids) == count:
            try:
                roles = {_is_generate_worker(pid): pid for pid in pids}
            except OSError:
                roles = {}
            if len(roles) == 2:
                return roles[False], roles[True]
        time.sleep(0.2)
    raise AssertionError(f"not two workers: {descendants(proc.pid)}\n{proc.log()}")


async def _ready(port: int, timeout_s: float = 90.0) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_stub(channel)
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service=rpc.SERVICE), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)


async def test_both_ports_serve_at_their_priorities_restart_in_role_and_drain_on_sigterm(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    generate_port = free_port()
    config = write_llm_config(tmp_path / "llm.yaml", upstream, ["slow"])
    proc = ServerProcess(
        ML_SERVING_GENERATE_PORT=str(generate_port),
        ML_SERVING_SHUTDOWN_GRACE_S=str(GRACE_S),
        ML_SERVING_LLM_CONFIG=str(config),
        ML_SERVING_LLM_FALLBACK="false",
        ML_SERVING_LOG_LEVEL="INFO",
    )
    delay = upstream.delay_s
    upstream.delay_s = 0.0
    try:
        main_pid, generate_pid = _workers(proc)
        await _ready(proc.port)
        await _ready(generate_port)
        # Every thread, those numpy started at import included: the kernel schedules threads.
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert _thread_niceness(main_pid) == {base}
        assert _thread_niceness(generate_pid) == {min(19, base + 10)}
        # ...and under SCHED_IDLE (ML_SERVING_GENERATE_SCHED_IDLE, on by default): a Score
        # thread that wakes preempts them at once.
        assert _thread_policies(main_pid) == {os.sched_getscheduler(0)}
        assert _thread_policies(generate_pid) == {os.SCHED_IDLE}

        async with (
            grpc.aio.insecure_channel(proc.address) as main_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{generate_port}") as generate_channel,
        ):
            main = pb_grpc.InferenceServiceStub(main_channel)
            generate = pb_grpc.InferenceServiceStub(generate_channel)
            assert (await main.Score(score_request(), timeout=10)).scores
            assert (await main.Generate(generate_request(), timeout=10)).text
            assert (await generate.Generate(generate_request(), timeout=10)).text
            text, _ = await collect(generate.GenerateStream(generate_stream_request(), timeout=10))
            assert text
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate.Score(score_request(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # A Generate-port process that dies is replaced by another Generate-port process.
        os.kill(generate_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while generate_pid in descendants(proc.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        main_again, generate_again = await asyncio.to_thread(_workers, proc)
        assert main_again == main_pid and generate_again != generate_pid
        await _ready(generate_port)
        assert _thread_niceness(generate_again) == {min(19, base + 10)}
        assert _thread_policies(generate_again) == {os.SCHED_IDLE}

        # SIGTERM to the supervisor only (as Kubernetes sends it): both ports drain.
        upstream.delay_s = 1.5
        async with (
            grpc.aio.insecure_channel(proc.address) as main_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{generate_port}") as generate_channel,
        ):
            main = pb_grpc.InferenceServiceStub(main_channel)
            generate = pb_grpc.InferenceServiceStub(generate_channel)
            in_flight = [
                asyncio.ensure_future(stub.Generate(generate_request(), timeout=15))
                for stub in (main, generate)
            ]
            async with asyncio.timeout(10):
                while upstream.in_progress < 2:
                    await asyncio.sleep(0.01)
            proc.popen.send_signal(signal.SIGTERM)
            for reply in await asyncio.gather(*in_flight):
                assert reply.text and not reply.fallback
        code = await asyncio.to_thread(proc.popen.wait, GRACE_S + 15)
        assert code == 0, proc.log()
        assert not _alive(main_pid) and not _alive(generate_again)
        assert _free(proc.port) and _free(generate_port)
    finally:
        upstream.delay_s = delay
        proc.stop()


def test_no_worker_of_either_port_outlives_a_killed_supervisor() -> None:
    generate_port = free_port()
    proc = ServerProcess(ML_SERVING_GENERATE_PORT=str(generate_port), ML_SERVING_LOG_LEVEL="INFO")
    pids: tuple[int, ...] = ()
    try:
        pids = _workers(proc)
        os.kill(proc.pid, signal.SIGKILL)  # nothing is forwarded: the lifeline pipe closes
        proc.popen.wait(10)
        deadline = time.monotonic() + 30
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], proc.log(50)
        assert _free(proc.port) and _free(generate_port)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stop()
