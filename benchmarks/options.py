"""Click parameter types the benchmark commands share."""

from __future__ import annotations

import click


class FrameSize(click.ParamType):
    """``WIDTHxHEIGHT`` -> (width, height); with ``square=True`` a single ``N`` -> (N, N) too."""

    name = "size"

    def __init__(self, square: bool = False):
        self.square = square

    def convert(self, value, param, ctx) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        if all(part.isdigit() and int(part) > 0 for part in parts) and (len(parts) == 2 or (len(parts) == 1 and self.square)):
            return int(parts[0]), int(parts[-1])
        self.fail(f"{value!r} is not {'N or ' if self.square else ''}WIDTHxHEIGHT (positive whole numbers)", param, ctx)


class Counts(click.ParamType):
    """``1,4,8`` -> (1, 4, 8): positive whole numbers, comma-separated."""

    name = "counts"

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if not all(part.strip().isdigit() and int(part) > 0 for part in parts):
            self.fail(f"{value!r}: write positive whole numbers separated by commas, e.g. 1,4,8", param, ctx)
        return tuple(int(part) for part in parts)
