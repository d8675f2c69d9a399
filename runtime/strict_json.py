"""Reading the folder's JSON records strictly (manifest, thresholds file, engine sidecar): every
field checked for its type and range, unknown and missing fields refused.

A check takes ``(key, value)`` and returns the value to store (converted where the dataclass
wants another type) or raises ValueError naming the key; the readers turn that into one line
naming the file and the command that remakes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, fields
from typing import Any, Callable

Check = Callable[[str, Any], Any]


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def parse(raw: bytes) -> Any:
    """JSON from UTF-8 bytes; UnicodeDecodeError or ValueError when it is neither."""
    return json.loads(raw.decode("utf-8"))


def build(cls: type, data: Any, checks: dict[str, Check]) -> Any:
    """``cls(**checked fields)`` from a parsed JSON object: no unknown field, none of the fields
    without a default missing, every field through its check."""
    need(isinstance(data, dict), f"a JSON {type(data).__name__}, not an object")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    need(not unknown, f"unknown fields {unknown}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in data]
    need(not missing, f"missing fields {missing}")
    return cls(**{key: checks.get(key, anything)(key, value) for key, value in data.items()})


def header(data: Any, name: str, version: int) -> None:
    """The ``format`` / ``format_version`` pair every versioned record starts with."""
    need(isinstance(data, dict), f"a JSON {type(data).__name__}, not an object")
    need(data.get("format") == name, f"format is {data.get('format')!r}, not {name!r}")
    need(data.get("format_version") == version, f"format version {data.get('format_version')!r}, this runtime "
                                                f"reads {version}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def anything(key: str, value: Any) -> Any:
    return value


def text(nonempty: bool = False) -> Check:
    def check(key: str, value: Any) -> str:
        need(isinstance(value, str) and (value != "" or not nonempty),
             f"{key} must be a {'non-empty ' if nonempty else ''}string, got {type(value).__name__}")
        return value
    return check


def flag(key: str, value: Any) -> bool:
    need(isinstance(value, bool), f"{key} must be true or false, got {type(value).__name__}")
    return value


def integer(minimum: int | None = None) -> Check:
    def check(key: str, value: Any) -> int:
        need(_is_int(value) and (minimum is None or value >= minimum),
             f"{key} must be an integer{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
        return value
    return check


def number(lo: float = -math.inf, hi: float = math.inf) -> Check:
    def check(key: str, value: Any) -> float:
        need(_is_number(value) and lo <= value <= hi, f"{key} must be a finite number in [{lo}, {hi}], got {value!r}")
        return float(value)
    return check


def integers(count: int) -> Check:
    """``count`` positive integers, as a tuple."""
    def check(key: str, value: Any) -> tuple[int, ...]:
        need(isinstance(value, list) and len(value) == count and all(_is_int(v) and v > 0 for v in value),
             f"{key} must be {count} positive integers, got {value!r}")
        return tuple(value)
    return check


def numbers(count: int, positive: bool = False) -> Check:
    """``count`` finite numbers, as a tuple of floats."""
    def check(key: str, value: Any) -> tuple[float, ...]:
        need(isinstance(value, list) and len(value) == count
             and all(_is_number(v) and (v > 0 or not positive) for v in value),
             f"{key} must be {count} finite{' positive' if positive else ''} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    return check


def sha256(key: str, value: Any) -> str:
    need(isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None, f"{key} must be a sha256 in hex")
    return value


def matching(pattern: str, example: str) -> Check:
    def check(key: str, value: Any) -> str:
        need(isinstance(value, str) and re.fullmatch(pattern, value) is not None,
             f"{key} must look like {example}, got {value!r}")
        return value
    return check


def choice(options) -> Check:
    def check(key: str, value: Any) -> Any:
        need(value in options, f"{key} must be one of {', '.join(map(str, options))}, got {value!r}")
        return value
    return check


def mapping(values: Check, what: str) -> Check:
    """An object from names to values that pass ``values`` (``what`` says what they are)."""
    def check(key: str, value: Any) -> dict:
        need(isinstance(value, dict) and all(isinstance(k, str) for k in value), f"{key} must map names to {what}")
        try:
            return {k: values(f"{key}.{k}", v) for k, v in value.items()}
        except ValueError:
            raise ValueError(f"{key} must map names to {what}") from None
    return check


def list_of(item: Check, what: str) -> Check:
    def check(key: str, value: Any) -> list:
        need(isinstance(value, list), f"{key} must be a list of {what}")
        try:
            return [item(key, v) for v in value]
        except ValueError:
            raise ValueError(f"{key} must be a list of {what}") from None
    return check


def either(*checks: Check) -> Check:
    """The first of ``checks`` that accepts the value."""
    def check(key: str, value: Any) -> Any:
        for one in checks[:-1]:
            try:
                return one(key, value)
            except ValueError:
                pass
        return checks[-1](key, value)
    return check


def null(key: str, value: Any) -> None:
    need(value is None, f"{key} must be null")
    return None


def shape(key: str, value: Any) -> list[int]:
    """A tensor shape: positive sizes, -1 for a dynamic axis."""
    need(isinstance(value, list) and len(value) >= 1 and all(_is_int(d) and (d > 0 or d == -1) for d in value),
         f"{key} must be a list of positive integers or -1")
    return value


def plain_object(key: str, value: Any) -> dict:
    need(isinstance(value, dict) and all(isinstance(k, str) for k in value), f"{key} must be an object")
    return value
