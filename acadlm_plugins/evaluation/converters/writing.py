"""Write converted rows: one JSON object per line, all or nothing.

Rows go to a temporary file next to the output, which replaces the output only once every row
is written and synced; a conversion that fails (a bad row, a full disk, Ctrl-C) leaves an
existing output untouched and no partial file behind. The same source and options always give
the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from acadlm_plugins.errors import DataError


def write_jsonl_atomically(rows: Iterable[dict[str, Any]], output: Path, *,
                           why_empty: Callable[[], str] = lambda: "") -> int:
    """Write ``rows`` to ``output`` through a temporary file and a rename; returns how many.
    Writing no row at all is an error (our task loaders reject empty files) whose message ends
    with ``why_empty()``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle_fd, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part",
                                            dir=output.parent)
    written = 0
    try:
        with os.fdopen(handle_fd, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            handle.flush()
            os.fsync(handle.fileno())
        if not written:
            raise DataError(f"no row to write to {output}{why_empty()}. Fix: check that the "
                            "file is the one this dataset expects.")
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def seeded_sample(rows: Iterable[dict[str, Any]], size: int,
                  seed: int) -> tuple[list[dict[str, Any]], int]:
    """A uniform random sample of ``size`` rows (reservoir sampling with a seeded generator),
    kept in source order, and how many rows were seen; the same seed gives the same sample."""
    rng = random.Random(seed)
    kept: list[tuple[int, dict[str, Any]]] = []
    seen = 0
    for index, row in enumerate(rows):
        seen = index + 1
        if len(kept) < size:
            kept.append((index, row))
        else:
            slot = rng.randrange(seen)
            if slot < size:
                kept[slot] = (index, row)
    return [row for _, row in sorted(kept, key=lambda entry: entry[0])], seen


def limited(items: list[Any], limit: int | None) -> list[Any]:
    """The first ``limit`` items (all when ``limit`` is None)."""
    return items if limit is None else items[:limit]
