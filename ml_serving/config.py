"""Settings: the one place configuration is read, from ML_SERVING_* environment variables."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
REPO_FEATURES = Path(__file__).resolve().parent.parent / "feature_repo"


class Settings(BaseSettings):
    """Every knob of the server; the README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(
        env_prefix="ML_SERVING_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # Error text would otherwise quote the inputs, secrets (auth_token) included.
        hide_input_in_errors=True,
    )

    host: str = "0.0.0.0"
    """Address the gRPC server binds to."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free port (tests)."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Prometheus metrics port; 0 turns the endpoint off."""
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    """Seconds in-flight RPCs get to finish after SIGTERM/SIGINT before they are cancelled."""
    max_concurrent_rpcs: int = Field(default=2048, ge=1)
    """InferenceService RPCs in flight at once; more are shed with RESOURCE_EXHAUSTED."""
    stream_stall_timeout_s: float = Field(default=30.0, gt=0)
    """A GenerateStream whose client takes no message for this long (its flow-control window
    stays shut) is ended: its slot and upstream call are freed."""
    max_receive_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request message accepted; larger ones get RESOURCE_EXHAUSTED."""
    max_send_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest response message sent."""
    keepalive_time_s: float = Field(default=30.0, gt=0)
    """Interval of server keepalive pings on idle connections."""
    keepalive_timeout_s: float = Field(default=10.0, gt=0)
    """How long a keepalive ping may go unanswered before the connection is closed."""
    max_connection_age_s: float = Field(default=300.0, gt=0)
    """Connections are asked to reconnect after this age, so L4 balancers spread load."""
    max_connection_age_grace_s: float = Field(default=30.0, ge=0)
    """Time an aged connection's in-flight RPCs get before it is closed."""
    workers: int = Field(default=1, ge=1, le=64)
    """Server processes sharing the gRPC port (SO_REUSEPORT); >1 needs a fixed port. Worker k
    serves /metrics on metrics_port + k. On Kubernetes, prefer replicas (one worker per pod)."""
    reuse_port: bool = False
    """Let other processes bind the same gRPC port (SO_REUSEPORT). Set for each worker by the
    supervisor when workers > 1; set it yourself only to run workers under another supervisor."""
    generate_port: int = Field(default=0, ge=0, le=65535)
    """A second gRPC port for Generate and GenerateStream, served by their own processes at a
    lower CPU priority (generate_nice, generate_sched_idle), so that an LLM relay never runs
    beside Score; the main port keeps serving every method. Non-zero makes `python -m
    ml_serving` a supervisor of `workers` processes on the main port and `generate_workers` on
    this one. 0 = off."""
    generate_workers: int = Field(default=1, ge=1, le=64)
    """Processes serving the Generate port (when generate_port is set); the first serves
    /metrics on metrics_port + workers, the next on + workers + 1, ..."""
    generate_nice: int = Field(default=10, ge=1, le=19)
    """How much lower the Generate port's processes run than the main port's (nice increment,
    every thread): under CPU contention the kernel gives them about a tenth of a main process's
    share at 10, so Score's processes get the cores first."""
    generate_sched_idle: bool = True
    """Run the Generate port's processes under Linux's SCHED_IDLE policy (every thread), on top
    of generate_nice: they get a core only when Score's processes leave it, and a Score thread
    that wakes takes it at once (nice alone waits for the scheduler's tick). Under a Score load
    that fills every core, Generate then runs only in what is left: give the pod cores for both
    (Score at saturation is the HPA's signal to add replicas). Off: nice only."""
    generate_only: bool = False
    """Serve only Generate and GenerateStream (other InferenceService methods answer
    UNIMPLEMENTED) at generate_nice. Set by the supervisor for the Generate port's processes;
    set it yourself only to run those under another supervisor."""
    uvloop: bool = True
    """Run the asyncio loop on uvloop (measured: same QPS, better tail at low concurrency)."""
    log_level: str = "INFO"
    """Root log level."""
    log_json: bool = True
    """One JSON object per log line (for log shippers); false gives plain text."""
    access_log_sample: float = Field(default=0.01, ge=0.0, le=1.0)
    """Share of the OK calls of Score and ListPromptVersions that write an access-log line (as
    Envoy and Istio sample theirs): every non-OK call and every Generate and GenerateStream call
    always writes one, and the metrics count every call. 1 logs every call."""

    otel_traces_exporter: str = Field(
        default="none", validation_alias=AliasChoices("OTEL_TRACES_EXPORTER")
    )
    """Standard OTEL_TRACES_EXPORTER: "otlp" turns tracing on (other OTEL_* tune the exporter)."""
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
    )
    """Standard OTLP endpoint variable; setting it also turns tracing on."""
    otel_service_name: str = Field(
        default="ml-serving", validation_alias=AliasChoices("OTEL_SERVICE_NAME")
    )
    """Standard OTEL_SERVICE_NAME for the spans' resource."""

    model_root: Path = REPO_MODELS
    """Root of the file-based model registry."""
    model_name: str = "tips-ranker"
    """Model served by Score; its promoted version is loaded."""
    model_poll_s: float = Field(default=2.0, gt=0)
    """How often the registry's PROMOTED pointer is checked for a new version."""
    model_uri: str | None = None
    """MLflow registry backend: models:/<name>@<alias> (follows the alias, e.g.
    models:/tips-ranker@champion) or models:/<name>/<version> (pinned). Unset: the file registry
    under model_root. The name comes from the URI; model_name is then unused."""
    model_cache_dir: Path = Path(tempfile.gettempdir()) / "ml-serving-model-cache"
    """Where MLflow versions are downloaded and validated; the last served one starts the server
    while MLflow is down."""
    model_poll_max_backoff_s: float = Field(default=30.0, gt=0)
    """Longest wait between polls while the registry is unreachable (doubling from model_poll_s)."""
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI")
    )
    """Standard MLFLOW_TRACKING_URI: the tracking server of model_uri, and where `make train`
    logs runs and registers versions when set. Credentials: MLflow's own MLFLOW_TRACKING_* vars."""
    max_candidates: int = Field(default=1000, ge=1)
    """Most candidates one Score request may carry."""
    feature_repo: Path | None = REPO_FEATURES
    """The Feast repository whose online store Score and Generate read (its feature_store.yaml:
    sqlite or Redis); empty turns lookups off (every model input must then come with the
    request). Default: the project's feature_repo/ (sqlite, data/online_store.db)."""
    feature_store_yaml: Path | None = None
    """Another feature_store.yaml for feature_repo (production: the Redis one, mounted from a
    ConfigMap); ``${VAR}`` in it is read from the environment, as Feast does. Default:
    feature_repo/feature_store.yaml."""
    feature_budget_ms: float = Field(default=5.0, gt=0)
    """Longest a user lookup may take on the hot path (no retries); past it the call goes on
    with training means, counted."""
    feature_breaker_failures: int = Field(default=5, ge=1)
    """Consecutive failed lookups that open the breaker (lookups are then skipped)."""
    feature_breaker_open_s: float = Field(default=5.0, gt=0)
    """How long the open breaker skips lookups before it tries one again."""
    feature_tip_refresh_s: float = Field(default=60.0, gt=0)
    """How often the tip view, held in memory, is reloaded from the store (a new tip is
    defaulted until then)."""
    feature_max_age_s: float = Field(default=0.0, ge=0)
    """Stored rows older than this are treated as missing (counted stale); 0 keeps every row,
    as Feast's own online read does. Production: a bound above the materialization interval
    (the views' TTL is 2 days)."""
    score_shadow_share: float = Field(default=0.0, ge=0, le=1)
    """Share of Score calls the shadow model version re-scores once the answer is on its way
    (the registry's SHADOW pointer; on MLflow the `challenger` alias), for the rank-agreement
    metrics; 0 = off (no pointer is polled)."""
    score_shadow_max_in_flight_rpcs: int = Field(default=64, ge=0)
    """Shadow comparisons are skipped (counted, reason busy) while more InferenceService RPCs
    than this are in flight: shadow work is the first thing shed under load."""

    llm_config: Path | None = None
    """LiteLLM model_list YAML; unset means the built-in offline route."""
    llm_model: str | None = None
    """Route alias Generate uses; unset means the first entry of the model list."""
    llm_timeout_margin_s: float = Field(default=0.05, ge=0)
    """Kept back from the caller's deadline so the upstream timeout fires first and maps cleanly."""
    llm_default_max_tokens: int = Field(default=160, ge=1)
    """max_tokens when a request leaves it at 0."""
    llm_max_tokens_limit: int = Field(default=1024, ge=1)
    """Largest max_tokens a request may ask for."""
    llm_max_call_s: float = Field(default=120.0, gt=0)
    """Longest a Generate call may take when its caller sets no deadline (an upstream that
    never ends cannot hold a call forever)."""
    llm_fallback: bool = True
    """When every route fails, answer a curated tip flagged fallback=true (else UNAVAILABLE)."""
    llm_http_client: str = Field(default="aiohttp", pattern="^(aiohttp|httpx)$")
    """The pooled HTTP client ("aiohttp" or "httpx") the provider path sends LLM requests on:
    one per process, sized from max_concurrent_rpcs; httpx measured at about 2.5x aiohttp's CPU
    per call and 2-2.5x per streamed chunk (scripts/llm_overhead.py)."""
    llm_answer_budget_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of upstream answers the process holds at once, all calls together (each answer is
    also bounded by its own max_tokens); past it a call's answer is not read: UNAVAILABLE or
    the fallback tip, counted as mlserving_llm_errors_total{reason="answer_budget"}."""
    llm_keepalive_s: float = Field(default=30.0, gt=0)
    """How long an idle upstream connection stays pooled for reuse."""
    llm_acompletion_routes: str = ""
    """Comma-separated route aliases to serve through litellm.acompletion instead of the
    provider path ("*" = all): the escape hatch if a LiteLLM upgrade breaks one family. Routes
    the provider path cannot serve go through acompletion anyway (logged once at start)."""
    llm_stream_coalesce_ms: float = Field(default=10.0, ge=0)
    """GenerateStream sends its first delta at once, then merges the deltas that arrive within
    this long of the last message into the next one (timer-free); 0 = one message per delta.
    10 measured (32 streams of 32 tokens): 2 ms between tokens, 33 -> 10 messages and 8.6 -> 4.0
    ms of server CPU a stream; 5 ms, 33 -> 16 and 6.6 -> 5.1; 20 ms, unchanged (20 would merge
    those too, at +14 ms between messages)."""

    default_prompt_version: str = Field(
        default="v1",
        validation_alias=AliasChoices(
            "DEFAULT_PROMPT_VERSION", "ML_SERVING_DEFAULT_PROMPT_VERSION"
        ),
    )
    """Prompt version used when a request names none (env DEFAULT_PROMPT_VERSION, as the seed)."""
    experiments: Path | None = None
    """YAML file of the prompt experiment (ML_SERVING_EXPERIMENTS); unset: no experiment, the
    request's version or the default. A bad file stops the server at start."""
    experiments_poll_s: float = Field(default=5.0, gt=0)
    """How often a thompson experiment's reward snapshot file is checked for a new one."""
    decision_log: Path | None = None
    """File the decision log appends JSON lines to; unset: the `ml_serving.decisions` logger.
    Decisions are logged when an experiment runs or this is set."""
    decision_user_key: SecretStr | None = None
    """Key of the user-id hash in the decision log (the raw id is never logged); set the same
    key on every replica so hashes join. Unset: a random key per process, with a warning."""

    tls_cert_file: Path | None = None
    """PEM certificate chain of the gRPC port; with tls_key_file it turns TLS on (no mesh)."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file; set both or neither."""
    tls_client_ca_file: Path | None = None
    """PEM CA bundle for mutual TLS: when set, clients must present a certificate it signed."""
    auth_token: SecretStr | None = None
    """Bearer token InferenceService calls must send (authorization: Bearer <token>); unset = off.
    Health and reflection stay open for probes."""

    @field_validator("auth_token")
    @classmethod
    def _check_auth_token(cls, token: SecretStr | None) -> SecretStr | None:
        # Never echo the value: pydantic puts the input in its error text.
        if token is not None and not _TOKEN_RE.fullmatch(token.get_secret_value()):
            raise ValueError("must be 16 to 512 visible ASCII characters with no spaces")
        return token

    @model_validator(mode="after")
    def _check_workers(self) -> Settings:
        if self.workers > 1 and self.port == 0:
            raise ValueError("ML_SERVING_WORKERS > 1 needs a fixed ML_SERVING_PORT (not 0)")
        if self.workers > 1 and self.metrics_port + self.workers - 1 > 65535:
            raise ValueError("ML_SERVING_METRICS_PORT + ML_SERVING_WORKERS - 1 exceeds 65535")
        return self

    @model_validator(mode="after")
    def _check_generate_port(self) -> Settings:
        if not self.generate_port:
            return self
        if self.generate_only:
            raise ValueError(
                "ML_SERVING_GENERATE_ONLY is for the Generate port's own processes: unset it, "
                "or unset ML_SERVING_GENERATE_PORT"
            )
        if self.port == 0:
            raise ValueError("ML_SERVING_GENERATE_PORT needs a fixed ML_SERVING_PORT (not 0)")
        if self.generate_port == self.port:
            raise ValueError("ML_SERVING_GENERATE_PORT must differ from ML_SERVING_PORT")
        last = self.metrics_port + self.workers + self.generate_workers - 1
        if self.metrics_port and last > 65535:
            raise ValueError(
                "ML_SERVING_METRICS_PORT + ML_SERVING_WORKERS + ML_SERVING_GENERATE_WORKERS - 1 "
                "exceeds 65535"
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "ML_SERVING_TLS_CERT_FILE and ML_SERVING_TLS_KEY_FILE must be set together"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "ML_SERVING_TLS_CLIENT_CA_FILE (mutual TLS) needs ML_SERVING_TLS_CERT_FILE and "
                "ML_SERVING_TLS_KEY_FILE"
            )
        return self


_TOKEN_RE = re.compile(r"[\x21-\x7e]{16,512}")
