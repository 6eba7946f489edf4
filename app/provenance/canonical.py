"""Canonical JSON that other languages reproduce: RFC 8785 (JCS) bytes and a lossless encoding of non-finite floats.

Format-2 manifests are signed over `jcs(manifest without signature)` (the `rfc8785` package), so
any RFC 8785 implementation, in JavaScript, Go or Rust, recomputes the signed bytes from the parsed
manifest. JSON has no Infinity or NaN, yet diffusers scheduler configs hold them (the DPM-Solver
samplers' `lambda_min_clipped` is `-inf`): such a float is written as `{"$float": "-Infinity"}`
(or `"Infinity"`, `"NaN"`) and `restore_floats` turns it back into the float, so
`Scheduler.from_config(config)` gets exactly the value the service used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import rfc8785

FLOAT_TAG = "$float"
_SPELLINGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def jcs(value: Any) -> bytes:
    """RFC 8785 canonical bytes of JSON data; ValueError on NaN/Infinity or integers beyond ±(2^53 - 1)."""
    return rfc8785.dumps(value)


def _spelling(number: float) -> str:
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def encode_floats(value: Any) -> Any:
    """A copy of JSON-like data, each non-finite float replaced by `{"$float": "Infinity" | "-Infinity" | "NaN"}`."""
    if isinstance(value, float) and not math.isfinite(value):
        return {FLOAT_TAG: _spelling(value)}
    if isinstance(value, Mapping):
        return {key: encode_floats(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encode_floats(item) for item in value]
    return value


def restore_floats(obj: dict[str, Any]) -> Any:
    """`json.loads(..., object_hook=restore_floats)`: a `{"$float": spelling}` object becomes that float."""
    if len(obj) == 1 and obj.get(FLOAT_TAG) in _SPELLINGS:
        return _SPELLINGS[obj[FLOAT_TAG]]
    return obj


def decode_floats(value: Any) -> Any:
    """The inverse of `encode_floats` on already parsed JSON data (a manifest, or one of its configs)."""
    if isinstance(value, Mapping):
        return restore_floats({key: decode_floats(item) for key, item in value.items()})
    if isinstance(value, list):
        return [decode_floats(item) for item in value]
    return value
