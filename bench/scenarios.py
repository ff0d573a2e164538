"""The scenarios: ghz JSON configs (bench/ghz/*.json) resolved into callable specs, and the plan."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

# Importing the generated module registers mlserving.v1 in the default descriptor pool.
from ml_serving._proto.mlserving.v1 import inference_service_pb2  # noqa: F401

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
GHZ_DIR = BENCH_DIR / "ghz"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)\s*$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """A ghz/Go duration ("10s", "500ms", "1m") or a number of seconds, in seconds."""
    if isinstance(text, int | float):
        return float(text)
    total, rest = 0.0, text.strip()
    # Go durations may chain units ("1m30s").
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", rest):
        total += float(number) * _UNITS[unit]
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+", rest.replace(" ", "")):
        raise ValueError(f"not a duration: {text!r}")
    return total


def split_call(call: str) -> tuple[str, str]:
    """ghz's `call` ("pkg.Service.Method" or "pkg.Service/Method") -> (service, method)."""
    if "/" in call:
        service, _, method = call.strip("/").rpartition("/")
    else:
        service, _, method = call.rpartition(".")
    if not service or not method:
        raise ValueError(f"call {call!r} is not 'package.Service.Method'")
    return service, method


def resolve_method(
    call: str, pool: descriptor_pool.DescriptorPool | None = None
) -> MethodDescriptor:
    """The method descriptor `call` names, from `pool` (default: the generated stubs' pool)."""
    pool = pool or descriptor_pool.Default()
    service_name, method_name = split_call(call)
    service = pool.FindServiceByName(service_name)
    method = service.methods_by_name.get(method_name)
    if method is None:
        raise KeyError(f"{service_name} has no method {method_name!r}")
    return method


def method_path(method: MethodDescriptor) -> str:
    """The HTTP/2 path of a method: /package.Service/Method."""
    return f"/{method.containing_service.full_name}/{method.name}"


@dataclass(frozen=True)
class CallSpec:
    """One kind of call a load generator makes; picklable, so client processes resolve it."""

    label: str
    """Short name in reports, e.g. "Score"."""
    call: str
    """Full method name as ghz writes it: mlserving.v1.InferenceService.Score."""
    request: bytes
    """The serialized request message (from the config's `data`)."""
    metadata: tuple[tuple[str, str], ...] = ()
    """ghz metadata; "{{.RequestNumber}}" is replaced per call."""
    timeout_s: float = 10.0
    echo: bool = False
    """Against the echo server: the response is the request bytes, parsed as the request type."""


@dataclass(frozen=True)
class GhzConfig:
    """The parts of a ghz JSON config the bench uses."""

    path: Path
    call: str
    data: dict[str, Any]
    concurrency: int
    total: int
    timeout_s: float
    metadata: dict[str, str]

    @property
    def method(self) -> MethodDescriptor:
        return resolve_method(self.call)

    def request(self) -> Message:
        """`data` parsed into the method's request type (json_format: ghz's protojson)."""
        cls = message_factory.GetMessageClass(self.method.input_type)
        message = cls()
        json_format.ParseDict(self.data, message)
        return message

    def spec(self, label: str | None = None, timeout_s: float | None = None) -> CallSpec:
        return CallSpec(
            label=label or self.method.name,
            call=self.method.full_name,
            request=self.request().SerializeToString(),
            metadata=tuple(self.metadata.items()),
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
        )


def load_ghz(path: Path) -> GhzConfig:
    """Read one ghz JSON config; raise ValueError on anything the bench cannot use."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    for key in ("call", "data"):
        if key not in raw:
            raise ValueError(f"{path}: ghz config needs {key!r}")
    return GhzConfig(
        path=path,
        call=str(raw["call"]),
        data=dict(raw["data"]),
        concurrency=int(raw.get("concurrency", 50)),
        total=int(raw.get("total", 200)),
        timeout_s=parse_duration(raw.get("timeout", "20s")),
        metadata={str(k): str(v) for k, v in (raw.get("metadata") or {}).items()},
    )


def ghz_configs(directory: Path = GHZ_DIR) -> dict[str, GhzConfig]:
    """Every bench/ghz/*.json, keyed by file stem (score, generate, generate_stream, ...)."""
    return {p.stem: load_ghz(p) for p in sorted(directory.glob("*.json"))}


@dataclass(frozen=True)
class Scenario:
    """A named load: one or more ghz configs (weighted when mixed) at a list of concurrencies."""

    name: str
    sources: tuple[tuple[str, float], ...]
    """(ghz config stem, weight) pairs; one pair for a plain scenario."""
    concurrencies: tuple[int, ...]
    duration_s: float
    """Each run stops at this many seconds or `total` calls, whichever comes first."""
    total: int | None = None
    """Calls per run; None means max(config total, 2 x concurrency)."""
    timeout_s: float | None = None
    """Per-call deadline; None means the config's `timeout`."""
    baseline: str | None = None
    """"echo" (bare gRPC server, same payload) or "direct" (client straight to the upstream)."""
    held: tuple[tuple[int, float, float, float], ...] = ()
    """(concurrency, ttft_s, token_delay_s, deadline_s): at that concurrency the calls are held,
    long-lived LLM calls: one wave of exactly `concurrency` calls, the upstream paced as given,
    each call with that deadline."""
    score_rate: float | None = None
    """Isolation scenarios (bench/isolation.py): Score offered open loop at this many calls/s,
    alone and beside the Generate source at `concurrencies[0]` in flight, in alternating
    rounds of `duration_s` each (rounds: Options.rounds)."""

    def held_pace(self, concurrency: int) -> tuple[float, float] | None:
        for c, ttft_s, token_delay_s, _ in self.held:
            if c == concurrency:
                return ttft_s, token_delay_s
        return None

    def timeout_for(self, concurrency: int) -> float | None:
        """The per-call deadline at this concurrency: a held wave's own, else `timeout_s`."""
        for c, _, _, deadline_s in self.held:
            if c == concurrency:
                return deadline_s
        return self.timeout_s

    def total_for(self, concurrency: int, configs: dict[str, GhzConfig]) -> int:
        if self.total is not None:
            return max(self.total, concurrency)
        if self.held_pace(concurrency) is not None:
            return concurrency
        config_total = max(configs[stem].total for stem, _ in self.sources)
        return max(config_total, 2 * concurrency)


HELD_UNARY = ((1000, 0.5, 0.15, 60.0),)
"""1,000 held Generate calls: the upstream answers after about 4.7 s (TTFT 0.5 s, 29 tokens
0.15 s apart), one wave, all open at once (the upstream reports its peak in flight)."""
HELD_STREAM = ((200, 2.0, 0.5, 120.0), (1000, 2.0, 0.5, 120.0))
"""Held GenerateStream waves: 200 and 1,000 calls started at once, TTFT 2 s, then 2 tokens a
second each (0.5 s apart: 400 and 2,000 chunks a second in all, about 16 s a stream), all open
together. The added TTFT of a wave is its TTFT less the upstream's 2 s (results rows:
held_added_ttft_ms): the 200-call wave is judged on it (one process starts 200 streams at once),
the 1,000-call wave on all completing. The deadline is raised to fit the pacing; the ghz
configs keep their own."""


def default_plan() -> list[Scenario]:
    """The full benchmark (about 6-7 minutes on 2 cores, with the worker sweep)."""
    return [
        Scenario("score", (("score", 1.0),), (1, 8, 64), duration_s=9.0, baseline="echo"),
        Scenario(
            "generate",
            (("generate", 1.0),),
            (1, 32, 1000),
            duration_s=8.0,
            baseline="direct",
            held=HELD_UNARY,
        ),
        Scenario(
            "generate_stream",
            (("generate_stream", 1.0),),
            (1, 32, 200, 1000),
            duration_s=8.0,
            baseline="direct",
            held=HELD_STREAM,
        ),
        Scenario("mixed", (("score", 0.8), ("generate", 0.2)), (32,), duration_s=8.0),
        ISOLATION,
    ]


ISOLATION = Scenario(
    "isolation", (("score", 1.0), ("generate", 1.0)), (32,), duration_s=6.0, score_rate=150.0
)
"""Score at 150 calls/s, alone and beside 32 Generate calls in flight (closed loop, as fast as
the server answers them: Generate at its saturation against the default-paced upstream)."""


def smoke_plan() -> list[Scenario]:
    """A few hundred calls per scenario (fewer streams, the slow path): every path works,
    with zero errors, in about 30 s once the server is ready."""
    return [
        Scenario("score", (("score", 1.0),), (8,), duration_s=8.0, total=400, baseline="echo"),
        Scenario(
            "generate", (("generate", 1.0),), (32,), duration_s=8.0, total=200, baseline="direct"
        ),
        Scenario(
            "generate_stream",
            (("generate_stream", 1.0),),
            (32,),
            duration_s=8.0,
            total=100,
            baseline="direct",
        ),
        Scenario("mixed", (("score", 0.8), ("generate", 0.2)), (16,), duration_s=8.0, total=300),
        replace(ISOLATION, duration_s=3.0),
    ]


def override(
    plan: list[Scenario],
    *,
    concurrency: dict[str, tuple[int, ...]],
    total: dict[str, int],
    duration: dict[str, float],
    timeout: dict[str, float],
) -> list[Scenario]:
    """Apply command-line overrides; key "*" applies to every scenario, a name to that one."""
    out = []
    for s in plan:
        changes: dict[str, Any] = {}
        for key in ("*", s.name):
            if key in concurrency:
                changes["concurrencies"] = concurrency[key]
            if key in total:
                changes["total"] = total[key]
            if key in duration:
                changes["duration_s"] = duration[key]
            if key in timeout:
                changes["timeout_s"] = timeout[key]
        out.append(replace(s, **changes))
    return out
