"""Builds the grpc.aio server: servicers, health, reflection, limits, warm-up, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ml_serving.api import rpc
from ml_serving.api.generate_port import servicer_class
from ml_serving.api.metrics import Metrics
from ml_serving.config import Settings
from ml_serving.experiments.runtime import Experiments
from ml_serving.features.lookup import FeatureLookup, LookupPolicy
from ml_serving.features.repo import StoreConfig
from ml_serving.features.stores import open_store
from ml_serving.generation.prompts.registry import PromptRegistry
from ml_serving.generation.service import Generator
from ml_serving.scoring import mlflow_registry
from ml_serving.scoring.model import max_request_bytes
from ml_serving.scoring.registry import ModelHolder, ModelRegistry
from ml_serving.scoring.shadow import ShadowScorer, pointer_for

logger = logging.getLogger(__name__)

SERVICE_NAME = rpc.SERVICE
"""'mlserving.v1.InferenceService': the health name readiness probes ask for."""


_QUIET_S = 0.05

PENDING_CALLS_FLOOR = 20_000
"""grpc's queue of calls not yet picked up holds this many (8x the RPC limit if more)."""


def queued_calls_bound(settings: Settings) -> int:
    """Calls grpc holds for the event loop, all connections together, exactly; past it grpc
    refuses a call itself, before the layer runs."""
    return max(PENDING_CALLS_FLOOR, 8 * settings.max_concurrent_rpcs)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: message sizes, keepalive and connection age (for L7-less balancing)."""
    ms = 1000
    queued = queued_calls_bound(settings)
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * ms)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5 * ms),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * ms)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * ms)),
        # Calls grpc has accepted but the event loop has not picked up yet: past
        # max_pending_requests (1,000 by default) grpc cancels them before any of our layer
        # runs, with no status we log or count (measured: 190 of a 2,000-call burst from one
        # client; with 10,000, 12 to 67 of 12,000), at random between it and the hard limit.
        # The soft limit is the hard one: the bound is exact. (A per-connection bound through
        # HTTP/2 max concurrent streams was tried: grpc refused some streams below it,
        # RST_STREAM REFUSED_STREAM, UNAVAILABLE to 460-909 of 12,000 calls: it counts a stream
        # until the event loop has let go of its call.)
        ("grpc.server.max_pending_requests", queued),
        ("grpc.server.max_pending_requests_hard_limit", queued),
        # One process owns the port unless worker processes are asked for explicitly: with
        # reuse on, a second server started by mistake would silently take half the traffic.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ]


@dataclass
class App:
    """A running server and the pieces tests and __main__ need to reach."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    gate: rpc.Gate
    models: ModelHolder
    prompts: PromptRegistry
    generator: Generator
    metrics: Metrics
    metrics_port: int | None = None
    """The bound /metrics port, or None when ML_SERVING_METRICS_PORT=0."""
    failure: str | None = None
    """Why start-up failed after listening began (e.g. a bad LLM config); None when fine."""
    experiments: Experiments | None = None
    """The prompt experiment's selector, decision log and shadow runner."""
    shadow: ShadowScorer | None = None
    """Score's shadow model version; None when ML_SERVING_SCORE_SHADOW_SHARE is 0."""
    features: FeatureLookup | None = None
    """The online feature store's lookups; None when ML_SERVING_FEATURE_REPO is empty."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_ready(self) -> None:
        """Wait for start-up work (LLM gateway import and warm-up) to finish."""
        await asyncio.shield(self._tasks[0])

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING at once, refuse new RPCs, give in-flight ones the grace period."""
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        logger.info("draining", extra={"grace_s": grace, "in_flight": self.gate.in_flight})
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        self.gate.draining = True
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self._refuse_queued_calls(grace, queued_calls_bound(self.settings))
        left = max(0.0, end - loop.time())
        # What is still open when `left` runs out, grpc cancels: its clients see UNAVAILABLE
        # ("Cancelling all calls"), and so do the layer's log line and metrics (Gate.cut_at).
        self.gate.cut_at = time.monotonic() + left
        await self.server.stop(left)
        if self.experiments is not None:
            await self.experiments.close()
        if self.features is not None:
            await self.features.close()
        self.metrics.close()
        self._stopped.set()
        logger.info("stopped")

    async def _refuse_queued_calls(self, cap_s: float, queued: int) -> None:
        """Let the calls grpc accepted but had not handed to us yet reach the RPC layer, which
        refuses them with UNAVAILABLE (retry elsewhere), logged and counted: server.stop
        cancels them unseen (measured: 2,317 of a 3,000-call burst CANCELLED at SIGTERM; with
        a 2 s cap, 4,676 of 8,000). Waits until none has arrived for a moment, or until
        `queued` more have (grpc's queue is first in, first out: every call queued at the
        signal has come through then), at most `cap_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cap_s
        arrived = self.gate.arrivals
        while loop.time() < deadline:
            if time.perf_counter() - self.gate.last_arrival > _QUIET_S:
                return
            if self.gate.arrivals - arrived >= queued:
                return
            await asyncio.sleep(_QUIET_S / 2)

    async def wait_stopped(self) -> None:
        """Return once stop() has finished."""
        await self._stopped.wait()


async def start(settings: Settings) -> App:
    """Load the model and prompts (fail fast on bad ones), start listening, then warm the LLM
    gateway in the background; readiness turns SERVING once it is warm."""
    prompts = PromptRegistry(default_version=settings.default_prompt_version)
    experiments = Experiments.load(
        settings.experiments,
        default_version=prompts.default_version,
        known_versions=prompts.known_versions(),
        decision_log=settings.decision_log,
        user_key=(
            settings.decision_user_key.get_secret_value().encode()
            if settings.decision_user_key
            else None
        ),
    )
    if settings.model_uri:
        # MLflow: starts from the local cache; the client is imported by the first poll, in a
        # thread, so nothing here waits for MLflow (or for its import).
        models = mlflow_registry.open_holder(
            settings.model_uri,
            cache_dir=settings.model_cache_dir,
            tracking_uri=settings.mlflow_tracking_uri,
        )
    else:
        models = ModelHolder(ModelRegistry(settings.model_root), settings.model_name)
    gate = rpc.Gate(
        limit=settings.max_concurrent_rpcs,
        auth_token=settings.auth_token,
        stall_timeout_s=settings.stream_stall_timeout_s,
        access_sample=settings.access_log_sample,
    )
    generator = Generator(
        prompts,
        default_max_tokens=settings.llm_default_max_tokens,
        max_tokens_limit=settings.llm_max_tokens_limit,
        timeout_margin_s=settings.llm_timeout_margin_s,
        fallback=settings.llm_fallback,
        experiments=experiments,
        max_call_s=settings.llm_max_call_s,
    )
    metrics = Metrics(gate, models)
    metrics.watch_experiments(experiments)
    shadow: ShadowScorer | None = None
    if settings.score_shadow_share > 0:
        shadow = ShadowScorer(
            pointer_for(models.registry),
            models.name,
            share=settings.score_shadow_share,
            max_in_flight_rpcs=settings.score_shadow_max_in_flight_rpcs,
        )
        metrics.watch_shadow(shadow)
    lookup = open_feature_lookup(settings)
    if lookup is not None:
        metrics.watch_features(lookup)
    generator.observer = metrics
    server = grpc.aio.server(options=grpc_options(settings))
    score_bound = rpc.TooLarge(
        max_request_bytes(settings.max_candidates),
        f"a Score request of at most {settings.max_candidates} candidates",
    )
    rpc.add_service(
        servicer_class(settings)(settings, gate, models, prompts, generator, shadow, lookup),
        server,
        size_bounds={"Score": score_bound},
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_generic_rpc_handlers((rpc.UnknownMethods(),))  # last: what no service has
    port = _add_port(server, settings)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    app = App(settings, server, port, health_servicer, gate, models, prompts, generator, metrics)
    app.experiments = experiments
    app.shadow = shadow
    app.features = lookup
    if settings.metrics_port:
        app.metrics_port = metrics.serve(settings.host, settings.metrics_port)
    app._tasks.append(asyncio.create_task(_warm_up(app), name="llm-warm-up"))
    watch = models.watch(settings.model_poll_s, settings.model_poll_max_backoff_s)
    app._tasks.append(asyncio.create_task(watch, name="model-watch"))
    app._tasks.append(asyncio.create_task(rpc.watch_stalls(gate), name="stall-watch"))
    app._tasks.append(
        asyncio.create_task(experiments.watch(settings.experiments_poll_s), name="snapshot-watch")
    )
    if shadow is not None:
        shadow_watch = shadow.watch(settings.model_poll_s, settings.model_poll_max_backoff_s)
        app._tasks.append(asyncio.create_task(shadow_watch, name="shadow-model-watch"))
    if lookup is not None:
        # Off the request path and off readiness: Score serves (with defaults) before it ends.
        app._tasks.append(asyncio.create_task(lookup.watch_tips(), name="tip-view-refresh"))
    logger.info(
        "listening",
        extra={
            "port": port,
            "model": f"{models.name}:{models.loaded.version if models.loaded else '(none yet)'}",
            "default_prompt_version": prompts.default_version,
        },
    )
    return app


def open_feature_lookup(settings: Settings) -> FeatureLookup | None:
    """The lookups on ML_SERVING_FEATURE_REPO's online store, or None when it is empty. A
    feature_store.yaml that cannot be served from stops start-up (a configuration error); a
    store that is down does not (lookups default until it answers)."""
    if settings.feature_repo is None or str(settings.feature_repo) in ("", "."):
        return None
    config = StoreConfig.load(settings.feature_repo, settings.feature_store_yaml)
    policy = LookupPolicy(
        budget_s=settings.feature_budget_ms / 1000.0,
        breaker_failures=settings.feature_breaker_failures,
        breaker_open_s=settings.feature_breaker_open_s,
        tip_refresh_s=settings.feature_tip_refresh_s,
        max_age_s=settings.feature_max_age_s,
    )
    logger.info(
        "feature store",
        extra={"kind": config.kind, "project": config.project, "repo": str(settings.feature_repo)},
    )
    return FeatureLookup(open_store(config), policy)


def _add_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind the gRPC port: TLS when a certificate and key are set (mutual TLS with a client CA),
    plaintext otherwise (behind a mesh, whose sidecar terminates mTLS)."""
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return server.add_insecure_port(address)
    client_ca = settings.tls_client_ca_file
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        # gRPC only says "failed to bind"; the usual cause here is a bad PEM or a key that does
        # not match the certificate (the C core logs which).
        raise ValueError(
            f"cannot serve TLS on {address}: check that {settings.tls_cert_file} and "
            f"{settings.tls_key_file} are a PEM certificate chain and its key, and that the "
            "port is free"
        ) from exc
    logger.info("TLS on", extra={"mutual_tls": client_ca is not None})
    return port


async def _warm_up(app: App) -> None:
    # Import in a thread: litellm's import is seconds of CPU that must not block serving Score.
    llm = await asyncio.to_thread(_import_llm, app.settings.max_concurrent_rpcs)
    settings = app.settings
    try:
        routes = (
            llm.load_routes(settings.llm_config) if settings.llm_config else llm.offline_routes()
        )
        gateway = llm.LLMGateway(
            routes,
            settings.llm_model,
            http_client=settings.llm_http_client,
            max_connections=settings.max_concurrent_rpcs,
            keepalive_s=settings.llm_keepalive_s,
            acompletion_routes=[
                a.strip() for a in settings.llm_acompletion_routes.split(",") if a.strip()
            ],
            stream_coalesce_s=settings.llm_stream_coalesce_ms / 1000,
            on_cooldown=app.metrics.llm_cooldown,
            answer_budget_bytes=settings.llm_answer_budget_bytes,
        )
        await gateway.warm_up()
    except Exception as exc:
        # A broken LLM config is a start-up failure: say why and stop rather than limp along.
        app.failure = f"LLM gateway failed to start: {exc}"
        logger.error("%s", app.failure)
        asyncio.get_running_loop().create_task(app.stop(0))
        return
    app.generator.gateway = gateway
    app._tasks.append(asyncio.create_task(_close_at_stop(app), name="llm-close"))
    # Ready means Score can answer too: a registry down at start with nothing cached holds it.
    await app.models.wait_loaded()
    await app.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    logger.info("ready", extra={"llm_route": gateway.alias, "llm_routes": list(routes.aliases)})


async def _close_at_stop(app: App) -> None:
    """Close the gateway's pooled HTTP client once the server has stopped (in-flight Generate
    calls keep it through the grace period)."""
    try:
        await app.wait_stopped()
    except asyncio.CancelledError:
        # App.stop cancels the start-up tasks before it drains: wait out the drain all the same.
        await app.wait_stopped()
    if app.generator.gateway is not None:
        await app.generator.gateway.aclose()


def _import_llm(max_upstream_connections: int):  # type: ignore[no-untyped-def]
    # LiteLLM sizes its own HTTP pool (routes on litellm.acompletion) from these at import
    # (defaults 1,000 in all and 500 per host): with one provider host, the 501st concurrent
    # Generate would wait silently for a connection. Every admitted RPC may hold one; an
    # operator's own values win. The provider path's pool is sized the same (LLMGateway).
    for name in ("AIOHTTP_CONNECTOR_LIMIT", "AIOHTTP_CONNECTOR_LIMIT_PER_HOST"):
        os.environ.setdefault(name, str(max_upstream_connections))
    from ml_serving.generation.llm import gateway as llm

    return llm
