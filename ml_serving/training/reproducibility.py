"""What "the same trained model" means across machines: the tolerances and the one comparison.

numpy and OpenBLAS pick SIMD kernels by CPU (AVX-512, AVX2, SSE), and kernels of different
widths add in different orders, so one seed trained on two machines gives weights that differ in
their last bits: hashes of trained artefacts differ, and exact float equality is a test of the
CPU, not of the code. Measured on the shipped model, before and after its training moved to
Feast (numpy 2.4.6, OpenBLAS 0.3.31, retrained with the AVX-512 kernels, without them, and
without AVX2): coefficients moved by up to 1e-13 (along the categories-versus-intercept
direction, which only the L2 penalty pins down), reference predictions by up to 3e-16, the
rounded card metrics not at all. The tolerances below sit far above that noise and far below
what a change of data, seed or code moves (another seed moved AUC in its third decimal). On one
machine a run is bit-for-bit repeatable: ``EXACT`` says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ml_serving.scoring.model import Model


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far two trainings of the same seed and code may differ and still be one model."""

    weight_rtol: float
    """Weights and normalisation: ``|got - want| <= weight_atol + weight_rtol * |want|``."""
    weight_atol: float
    """See ``weight_rtol``."""
    prediction_atol: float
    """Predicted probabilities (the card's reference rows, or any caller's rows)."""
    metric_atol: float
    """Card metrics, which training rounds to 6 decimals: a last-bit difference that straddles
    a rounding boundary moves one by one unit of the sixth decimal."""
    data_rtol: float
    """Feature values of the training data quoted in the card (float32)."""


ACROSS_MACHINES: Final = Tolerance(
    weight_rtol=1e-9,
    weight_atol=1e-10,
    prediction_atol=1e-12,
    metric_atol=1e-6,
    data_rtol=2.0**-23,  # one float32 unit in the last place
)
"""The definition of a reproduced model: same seed, same code, any x86-64 CPU."""
EXACT: Final = Tolerance(0.0, 0.0, 0.0, 0.0, 0.0)
"""Bit for bit: two runs in one process (one CPU, one set of kernels)."""

NOT_REPRODUCED: Final = frozenset({"version", "rollout_history", "weights_sha256"})
"""Card keys that describe one stored copy, not the training: its number, its history and the
hash of its own weights file (which the registry checks against that file only)."""

# Decimals are not exact in binary: round(x, 6) values one unit apart differ by 1e-6 plus a
# few ulps (0.054662 - 0.054661 == 1.0000000000000286e-06).
_DECIMAL_SLACK: Final = 1e-12
# A decimal number inside a text (the card's model-selection reason quotes metrics).
_NUMBER: Final = re.compile(r"(-?\d+\.\d+)")


def weight_differences(
    got: Mapping[str, npt.ArrayLike],
    want: Mapping[str, npt.ArrayLike],
    tolerance: Tolerance = ACROSS_MACHINES,
) -> list[str]:
    """What differs beyond ``tolerance`` between two weight sets (``ModelWeights.to_arrays()``
    or a weights file's arrays), one line per array; empty when they are the same model's."""
    out = [f"weights[{k!r}]: missing" for k in sorted(set(want) - set(got))]
    out += [f"weights[{k!r}]: unexpected" for k in sorted(set(got) - set(want))]
    for key in sorted(set(got) & set(want)):
        out += _array_differences(
            f"weights[{key!r}]", got[key], want[key], tolerance.weight_atol, tolerance.weight_rtol
        )
    return out


def prediction_differences(
    got: npt.ArrayLike,
    want: npt.ArrayLike,
    tolerance: Tolerance = ACROSS_MACHINES,
    *,
    what: str = "predictions",
) -> list[str]:
    """What differs beyond ``tolerance`` between two models' predictions on the same rows."""
    return _array_differences(what, got, want, tolerance.prediction_atol, 0.0)


def card_differences(
    got: Mapping[str, Any], want: Mapping[str, Any], tolerance: Tolerance = ACROSS_MACHINES
) -> list[str]:
    """What differs beyond ``tolerance`` between two model cards, one line per value, named by
    its path (``metrics.heldout.auc``). Keys in ``NOT_REPRODUCED`` are skipped; floats are held
    to the tolerance their section calls for (weights, predictions, data or metrics); integers,
    booleans and the text around numbers must be equal."""
    out: list[str] = []
    keys = (set(got) | set(want)) - NOT_REPRODUCED
    for key in sorted(keys):
        _compare(key, got.get(key, _MISSING), want.get(key, _MISSING), tolerance, out)
    return out


def model_differences(got: Model, want: Model, tolerance: Tolerance = ACROSS_MACHINES) -> list[str]:
    """What differs beyond ``tolerance`` between two trained models (weights and card);
    empty when ``got`` reproduces ``want``."""
    out = [] if got.name == want.name else [f"name: {got.name!r} != {want.name!r}"]
    out += weight_differences(got.weights.to_arrays(), want.weights.to_arrays(), tolerance)
    return out + card_differences(got.card, want.card, tolerance)


# --- the card's values ---------------------------------------------------------------------------

_MISSING: Final = object()


def _float_bound(path: str, want: float, tolerance: Tolerance) -> float:
    """The largest difference allowed for one float of the card, by the section it sits in."""
    if path.startswith(("parameters.", "inputs.")):  # weights and the normalisation
        return tolerance.weight_atol + tolerance.weight_rtol * abs(want)
    if path.startswith("reference_rows["):
        if path.endswith(".prediction"):
            return tolerance.prediction_atol
        return tolerance.data_rtol * abs(want)  # the row's feature values
    return tolerance.metric_atol + (_DECIMAL_SLACK if tolerance.metric_atol else 0.0)


def _compare(path: str, got: Any, want: Any, tolerance: Tolerance, out: list[str]) -> None:
    if got is _MISSING or want is _MISSING:
        out.append(f"{path}: {'missing' if got is _MISSING else 'unexpected'}")
    elif isinstance(want, Mapping) and isinstance(got, Mapping):
        for key in sorted(set(got) | set(want)):
            _compare(
                f"{path}.{key}", got.get(key, _MISSING), want.get(key, _MISSING), tolerance, out
            )
    elif isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            out.append(f"{path}: {len(got)} items != {len(want)}")
            return
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _compare(f"{path}[{i}]", g, w, tolerance, out)
    elif _is_float(got) and _is_float(want) and (isinstance(got, float) or isinstance(want, float)):
        bound = _float_bound(path, float(want), tolerance)
        diff = abs(float(got) - float(want))
        if not diff <= bound:  # `not <=`: a NaN on either side is a difference
            out.append(f"{path}: {got!r} != {want!r} (|diff| {diff:.3g} > {bound:.3g})")
    elif isinstance(want, str) and isinstance(got, str) and tolerance.metric_atol:
        if not _same_text(got, want):
            out.append(f"{path}: {got!r} != {want!r}")
    elif type(got) is not type(want) or got != want:
        out.append(f"{path}: {got!r} != {want!r}")


def _is_float(value: Any) -> bool:
    # bool is an int: True must not pass for 1.0.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_text(got: str, want: str) -> bool:
    """Equal text, except that each decimal number may differ by one unit of its last printed
    digit (a text quoting a metric to 4 decimals follows the metric's rounding)."""
    got_parts, want_parts = _NUMBER.split(got), _NUMBER.split(want)
    if len(got_parts) != len(want_parts):
        return False
    # re.split with one group alternates text (even) and numbers (odd).
    for i, (g, w) in enumerate(zip(got_parts, want_parts, strict=True)):
        if i % 2 == 0:
            if g != w:
                return False
        else:
            unit = 10.0 ** -len(w.split(".")[1])
            if not abs(float(g) - float(w)) <= unit + _DECIMAL_SLACK:
                return False
    return True


def _array_differences(
    what: str, got: npt.ArrayLike, want: npt.ArrayLike, atol: float, rtol: float
) -> list[str]:
    g = np.asarray(got)
    w = np.asarray(want)
    if g.shape != w.shape:
        return [f"{what}: shape {g.shape} != {w.shape}"]
    if g.dtype != w.dtype:
        return [f"{what}: dtype {g.dtype} != {w.dtype}"]
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    diff = np.abs(g64 - w64)
    bound = atol + rtol * np.abs(w64)
    # ~(diff <= bound), not diff > bound: a NaN on either side is a difference.
    off = ~(diff <= bound)
    if not off.any():
        return []
    # The worst value beyond tolerance (a NaN counts as the worst), by its flat index.
    flat_diff, flat_bound = diff.reshape(-1), bound.reshape(-1)
    worst = int(np.argmax(np.where(off.reshape(-1), np.nan_to_num(flat_diff, nan=np.inf), -1.0)))
    flat_g, flat_w = g64.reshape(-1), w64.reshape(-1)
    where = f"[{worst}]" if g.ndim else ""
    return [
        f"{what}: {int(off.sum())} of {off.size} values beyond tolerance; worst {what}{where} "
        f"{float(flat_g[worst])!r} != {float(flat_w[worst])!r} (|diff| {flat_diff[worst]:.3g} > "
        f"{flat_bound[worst]:.3g})"
    ]
