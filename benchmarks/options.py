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



def throughput_options(artifacts_help: str, backend_default: str, threads_help: str):
    """What the throughput benchmarks share: ``--artifacts`` (default artifacts/demo, which the README's
    first command writes), ``--class``, ``--backend``, ``--threads`` and ``--json``, in this order."""
    from anoclip.runtime.backends import BACKEND_CHOICES

    def decorate(command):
        command = click.option("--json", "as_json", is_flag=True,
                               help="Print the result as JSON instead of the table.")(command)
        command = click.option("--threads", default=None, type=click.IntRange(min=1), help=threads_help)(command)
        command = click.option("--backend", default=backend_default, show_default=True,
                               type=click.Choice(BACKEND_CHOICES))(command)
        command = click.option("--class", "cls", default=None,
                               help="Class to score (default: the first in the prompt weights).")(command)
        return click.option("--artifacts", default="artifacts/demo", show_default=True,
                            type=click.Path(file_okay=False), help=artifacts_help)(command)

    return decorate
