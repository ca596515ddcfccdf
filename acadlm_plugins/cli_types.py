"""argparse value types shared by the console scripts and benchmarks: a count given on the
command line is refused by argparse (exit 2, naming the flag) when it is out of range, instead
of being read as something else (``--repeats 0`` as "no repeat", ``--limit 0`` as "no
limit")."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse
