"""The one place numeric DICOM attributes are parsed: a malformed value becomes an error that names it.

pydicom (3.x, reading validation "warn") keeps a value it cannot parse as the raw text, so a
``GantryDetectorTilt`` holding the byte ``0xEE`` arrives as ``'î'`` and a bare ``float()`` later
fails with "could not convert string to float: 'î'", naming neither the file nor the attribute. Every
numeric attribute the pipeline reads goes through these helpers instead; their
:class:`MalformedAttributeError` says which file, which attribute and which value, so the series or
instance can be refused with a reason and no traceback reaches the log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

__all__ = ["MalformedAttributeError", "integer", "number", "numbers"]


class MalformedAttributeError(ValueError):
    """A present DICOM attribute whose value is not what its VR promises."""

    def __init__(self, where: str, keyword: str, value: Any, expected: str) -> None:
        tag = tag_for_keyword(keyword)
        label = f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword
        super().__init__(f"{where}: {label} has a malformed value {_shown(value)} (expected {expected})")
        self.where, self.keyword, self.value = where, keyword, value


def _shown(value: Any) -> str:
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return repr(text if len(text) <= 40 else text[:40] + "…")


def _raw(ds: Dataset, keyword: str) -> Any:
    """The element's value, or None when absent or empty; never raises for a bad value."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 0:
        return None
    return value


def _to_float(value: Any) -> float | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    try:
        result = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return result if math.isfinite(result) else None


def numbers(ds: Dataset, keyword: str, where: str, count: int | None = None) -> tuple[float, ...] | None:
    """All values of ``keyword`` as floats (``count`` of them when given); None when absent."""
    return _parse(ds, keyword, where, count, f"{count} number(s)" if count else "numbers")


def _parse(
    ds: Dataset, keyword: str, where: str, count: int | None, expected: str
) -> tuple[float, ...] | None:
    value = _raw(ds, keyword)
    if value is None:
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    if isinstance(value, str) and "\\" in value:
        items = value.split("\\")
    parsed = [_to_float(v) for v in items]
    if any(v is None for v in parsed) or (count is not None and len(parsed) != count):
        raise MalformedAttributeError(where, keyword, "\\".join(str(v) for v in items), expected)
    return tuple(parsed)  # type: ignore[arg-type]


def number(ds: Dataset, keyword: str, where: str, default: float | None = None) -> float | None:
    """The single value of ``keyword`` as a float; ``default`` when absent or empty."""
    found = _parse(ds, keyword, where, 1, "a number")
    return default if found is None else found[0]


def integer(ds: Dataset, keyword: str, where: str, default: int | None = None) -> int | None:
    """The single value of ``keyword`` as an int; ``default`` when absent or empty."""
    value = number(ds, keyword, where)
    if value is None:
        return default
    if not value.is_integer():
        raise MalformedAttributeError(where, keyword, value, "an integer")
    return int(value)
