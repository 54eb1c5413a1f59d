"""Strict JSON for metrics and summaries: ``NaN`` and ``Infinity`` are not JSON (RFC 8259 §6),
and strict parsers (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``) reject them."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (in nested dicts/lists) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_record(record: dict) -> dict:
    """A flat metrics record with non-finite floats as ``None`` and their keys listed under
    ``"nonfinite"`` (absent when all values are finite)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    out = finite_or_none(record)
    if bad:
        out["nonfinite"] = bad
    return out
