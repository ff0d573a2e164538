"""Where flows run: a Prefect server when PREFECT_API_URL is set, else a temporary local API.

The temporary API is Prefect's own test harness (``prefect_test_harness``): a Prefect server
in a child process on 127.0.0.1 with a throwaway sqlite database, started for the run and
stopped after it. ``PREFECT_HOME`` points at a temporary folder for the run (nothing is left
in the user's ``~/.prefect``) and the server's anonymous usage telemetry is off.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

STARTUP_TIMEOUT_S: Final = 90
"""How long the temporary API may take to start (about 10 s on a loaded 2-core machine)."""


@contextmanager
def prefect_api() -> Iterator[str]:
    """Run the enclosed flows against PREFECT_API_URL when it is set, else against a temporary
    local API (see the module docstring); yields a line saying which."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    url = PREFECT_API_URL.value()
    if url:
        yield f"the Prefect server at {url}"
        return
    with (
        tempfile.TemporaryDirectory(prefix="ml-serving-prefect-") as home,
        temporary_settings(updates={PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=STARTUP_TIMEOUT_S),
    ):
        yield "a temporary local Prefect API (PREFECT_API_URL is unset)"
