"""Training reproduces the shipped model on another instruction set: `python -m ml_serving.training`
with numpy's SIMD dispatch and OpenBLAS's kernels narrowed to SSE4.2 (x86-64-v2)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml_serving.scoring.registry import ModelRegistry
from ml_serving.training.reproducibility import model_differences
from tests.support import REPO

NAME = "tips-ranker"

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets only"
)

# numpy's dispatch targets on this machine, as numpy names them (2.4: X86_V3 is AVX2 with FMA3
# and friends, X86_V4 and AVX512_* the AVX-512 family; older releases named AVX2, AVX512F, ...).
_SIMD = np.show_config(mode="dicts")["SIMD Extensions"]
FOUND: list[str] = list(_SIMD.get("found", []))  # numpy leaves out an empty list
DISPATCH: list[str] = FOUND + list(_SIMD.get("not found", []))
AVX512 = [t for t in DISPATCH if t.startswith("AVX512") or t == "X86_V4"]
AVX2 = [t for t in DISPATCH if t in ("X86_V3", "AVX2", "FMA3")]

# The child checks, in the process that trains, that the narrowing took: numpy's targets found
# and the kernels OpenBLAS chose (threadpoolctl: in the dev lock), then runs the training CLI.
_CHILD = """
import json, runpy, sys
import numpy as np, threadpoolctl
found = np.show_config(mode="dicts")["SIMD Extensions"].get("found", [])
blas = [i.get("architecture") for i in threadpoolctl.threadpool_info()
        if i["internal_api"] == "openblas"]
print("dispatch: " + json.dumps({"found": found, "openblas": blas}), flush=True)
sys.argv = ["ml_serving.training", *sys.argv[1:]]
runpy.run_module("ml_serving.training", run_name="__main__")
"""


def test_training_reproduces_the_shipped_model_on_sse42_kernels(tmp_path: Path) -> None:
    # The farthest from any machine's native kernels: an x86-64-v2 CPU (SSE4.2; no AVX, AVX2 or
    # AVX-512), numpy's baseline and OpenBLAS's Nehalem kernels. A training takes 20-30 s here, so
    # `make test` runs this one; the README's Development section runs the AVX2 one by hand.
    disabled, coretype = AVX512 + AVX2, "Nehalem"
    root = tmp_path / "models"
    shutil.copytree(REPO / "models", root)
    registry = ModelRegistry(root)
    served, before = registry.promoted_version(NAME), set(registry.versions(NAME))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ML_SERVING_")},
        "NPY_DISABLE_CPU_FEATURES": " ".join(disabled),
        "OPENBLAS_CORETYPE": coretype,
    }
    done = subprocess.run(
        # -W error::ImportWarning: numpy only warns about a name it does not dispatch.
        [sys.executable, "-W", "error::ImportWarning", "-c", _CHILD]
        + ["--root", str(root), "--name", NAME],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("dispatch: ")]
    seen = json.loads(line.removeprefix("dispatch: "))
    assert seen["found"] == [t for t in FOUND if t not in disabled], seen
    assert seen["openblas"] == [coretype], seen
    (version,) = set(registry.versions(NAME)) - before
    assert model_differences(registry.load(NAME, version), registry.load(NAME, served)) == []
