"""Every metric the shipped rules and dashboard query is one the server exports: checked on a live
/metrics scrape after calls of every RPC, with an experiment, a shadow model and LLM routes on."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.config import REPO_FEATURES
from tests.support import monitoring
from tests.support.fake_openai import FakeOpenAI
from tests.support.model_versions import NAME, copy_shipped
from tests.support.requests import generate_request, generate_stream_request, score_request
from tests.support.server_process import free_port
from tests.support.servers import StartServer, write_llm_config


def test_the_extractor_finds_selectors_and_skips_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (job, le) (rate(a_total{code=~"X|Y",le="0.05"}[5m])) / ignoring(x) '
        "histogram_quantile(0.9, b_bucket offset 5m) > bool 1 and on (job) rec:ord:x"
    )
    assert monitoring.metric_names(expr) == {"a_total", "b_bucket", "rec:ord:x"}


async def test_rules_and_dashboard_query_only_exported_metrics(
    start_server: StartServer, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    # A failing route that falls back to a working one: errors, a cooldown, tokens, latency.
    config = write_llm_config(
        tmp_path / "llm.yaml",
        upstream,
        ["status-500", "ok"],
        fallbacks=[{"status-500": ["ok"]}],
        disable_cooldowns=False,
        allowed_fails=0,
        cooldown_time=60,
    )
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(
        yaml.safe_dump(
            {
                "experiments": [
                    {
                        "name": "tip-prompts",
                        "variants": {"v1": 50, "v2-mentor": 50},
                        "shadow": {"prompt_version": "v3-few-shot", "share": 1.0},
                    }
                ]
            }
        )
    )
    copy_shipped(tmp_path / "models")
    port = free_port()
    app = await start_server(
        metrics_port=port,
        llm_config=config,
        llm_model="status-500",
        experiments=experiments,
        decision_log=tmp_path / "decisions.jsonl",
        model_root=tmp_path / "models",
        model_name=NAME,
        score_shadow_share=1.0,
        feature_repo=REPO_FEATURES,  # the embedded online store: the feature-store series
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        for _ in range(3):
            await stub.Score(score_request())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Score(score_request(candidates=0))
        await stub.Generate(generate_request(), timeout=10)
        async for _ in stub.GenerateStream(generate_stream_request(), timeout=10):
            pass
        await stub.ListPromptVersions(pb.ListPromptVersionsRequest(), timeout=10)

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    exported = monitoring.exported_names(await asyncio.to_thread(get))
    # The calls above moved these: the scrape is the real one, not an empty registry.
    assert {"mlserving_llm_cooldowns_total", "mlserving_decision_log_lines_total"} <= exported

    recorded = {rule["record"] for rule in monitoring.rules() if "record" in rule}
    queried: dict[str, set[str]] = {}
    for rule in monitoring.rules():
        for name in monitoring.metric_names(rule["expr"]):
            queried.setdefault(name, set()).add(rule.get("alert") or rule["record"])
    for expr in monitoring.dashboard_queries():
        for name in monitoring.metric_names(expr):
            queried.setdefault(name, set()).add("dashboard")
    for name in monitoring.variable_metric_names():
        queried.setdefault(name, set()).add("dashboard variables")
    assert len(queried) > 30
    missing = {
        name: sorted(where)
        for name, where in queried.items()
        if name not in exported and name not in recorded
    }
    assert not missing, f"queried but not exported by the server: {missing}"
