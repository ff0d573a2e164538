"""Who may call and what may run: bearer-token checks and start-up supply-chain checks.

Pure functions over metadata tuples and paths (no grpc here): ``rpc`` calls
:func:`check_bearer` on every InferenceService call; ``__main__`` calls
:func:`supply_chain_problems` before serving and refuses to start when it finds any.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import re
import site
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from pydantic import SecretStr

from ml_serving import errors

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY: Final = "authorization"
"""gRPC metadata key of the bearer token (HTTP/2 header names are lower case)."""

_BEARER: Final = "bearer"
_UNAUTHENTICATED: Final = (
    "this call needs 'authorization: Bearer <token>' metadata with the service token"
)

Metadata = Iterable[tuple[str, str | bytes]]


def check_bearer(metadata: Metadata | None, token: SecretStr | None) -> None:
    """Pass when ``token`` is None (auth off) or the metadata carries exactly one
    ``authorization: Bearer <token>`` entry whose token equals it; else raise
    :class:`~ml_serving.errors.Unauthenticated`.

    The comparison is constant-time over bytes (``hmac.compare_digest``), so neither timing nor a
    non-ASCII value tells the caller anything; the message never echoes what was sent.
    """
    if token is None:
        return
    values = [v for k, v in metadata or () if k.lower() == AUTHORIZATION_KEY]
    if len(values) != 1:
        raise errors.Unauthenticated(_UNAUTHENTICATED)
    value = values[0]
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    scheme, _, presented = raw.strip().partition(b" ")
    expected = token.get_secret_value().encode("utf-8")
    # Evaluate both halves before deciding: no early exit on the scheme either.
    scheme_ok = scheme.lower() == _BEARER.encode()
    token_ok = hmac.compare_digest(presented.strip(), expected)
    if not (scheme_ok and token_ok):
        raise errors.Unauthenticated(_UNAUTHENTICATED)


# --- start-up supply-chain checks ------------------------------------------------------------

KNOWN_BAD_LITELLM: Final = frozenset({"1.82.7", "1.82.8"})
"""LiteLLM releases published by an attacker (malicious code in the package): never run them."""

PTH_ALLOWED: Final[tuple[tuple[re.Pattern[str], re.Pattern[str]], ...]] = (
    # setuptools: lets its vendored distutils take precedence over the stdlib's.
    (
        re.compile(r"distutils-precedence\.pth"),
        re.compile(
            r"import os; var = 'SETUPTOOLS_USE_DISTUTILS'; "
            r"enabled = os\.environ\.get\(var, '(local|stdlib)'\) == 'local'; "
            r"enabled and __import__\('_distutils_hack'\)\.add_shim\(\);?\s*"
        ),
    ),
    # setuptools editable installs (`pip install -e .`): a finder for the project's own package.
    (
        re.compile(r"__editable__\.[A-Za-z0-9_.-]+\.pth"),
        re.compile(r"import (__editable___\w+_finder); \1\.install\(\)\s*"),
    ),
)
"""(file name, import line) pairs a .pth start-up hook may be; anything else is refused."""


def check_litellm_release(version_of: Callable[[str], str] | None = None) -> list[str]:
    """Problems with the installed LiteLLM: a release known to be malicious.

    ``version_of`` defaults to ``importlib.metadata.version``: the installed distribution's
    metadata, read without importing litellm (importing a malicious release runs it).
    """
    try:
        version = (version_of or importlib.metadata.version)("litellm")
    except importlib.metadata.PackageNotFoundError:
        return []  # nothing installed, nothing to refuse; the LLM gateway reports its own error
    if version in KNOWN_BAD_LITELLM:
        return [
            f"litellm {version} is a known malicious release "
            f"({', '.join(sorted(KNOWN_BAD_LITELLM))}): reinstall from the hash-locked "
            "requirements and rotate every key this environment could read"
        ]
    return []


def site_dirs() -> list[Path]:
    """Directories whose .pth files Python runs at start-up: site-packages, user site too."""
    dirs = [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(Path(site.getusersitepackages()))
    return dirs


def scan_pth_hooks(dirs: Iterable[Path]) -> list[str]:
    """Problems with .pth files in ``dirs``: any executable ``import`` line not allowlisted.

    Python's ``site`` module executes every .pth line that starts with ``import`` (followed by a
    space or tab) in every interpreter that starts, before any of our code: a known way for a
    poisoned package to run at start-up without being imported. Plain path lines are harmless.
    """
    problems = []
    for directory in dirs:
        try:
            files = sorted(directory.glob("*.pth"))
        except OSError:
            continue
        for path in files:
            try:
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError as exc:
                problems.append(f"{path}: unreadable start-up hook file ({exc.strerror})")
                continue
            for number, line in enumerate(lines, 1):
                if not line.startswith(("import ", "import\t")):
                    continue
                if not _allowed(path.name, line):
                    problems.append(
                        f"{path}:{number}: unexpected start-up hook {_shorten(line)!r}; "
                        "remove the package that installed it or recreate the environment"
                    )
    return problems


def _allowed(name: str, line: str) -> bool:
    return any(
        name_re.fullmatch(name) and line_re.fullmatch(line) for name_re, line_re in PTH_ALLOWED
    )


def _shorten(line: str, limit: int = 120) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def supply_chain_problems(
    *,
    version_of: Callable[[str], str] | None = None,
    dirs: Sequence[Path] | None = None,
) -> list[str]:
    """Everything that should stop the server from starting in this environment."""
    return check_litellm_release(version_of) + scan_pth_hooks(site_dirs() if dirs is None else dirs)
