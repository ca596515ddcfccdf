"""The manifest of the embedded default: every built file with its sha256, size and provenance.

``<home>/manifest.json`` has one entry per component (``model``, ``corpus``)::

    {"format": 1,
     "components": {
       "corpus": {"recipe_version": 1, "built_at": "...", "build_seconds": 12.3,
                  "files": [{"path": "corpus/code/train.jsonl", "sha256": "...", "bytes": 123,
                             "provenance": [{"package": "cpython", "version": "3.11.9", ...}]}],
                  "domains": {"code": {"train_docs": 10, ...}}}}}

A build is skipped when its component is recorded with the same ``recipe_version`` and every
file still has its recorded sha256, which is what makes ``acadlm-defaults build`` idempotent.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from acadlm_plugins.defaults.paths import manifest_path
from acadlm_plugins.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
COMPONENTS = ("model", "corpus")
_warned_unreadable: set[tuple[str, int, int]] = set()  # (path, mtime_ns, size) already warned of


class ManifestUnreadableError(DataError):
    """``manifest.json`` exists but is not a manifest (truncated, not JSON, wrong shape)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(
            f"{path}: unreadable manifest ({reason}). Delete it and run `acadlm-defaults build`, "
            "which rebuilds what the manifest no longer vouches for."
        )


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(home: Path, path: Path, provenance: list[dict[str, Any]]) -> dict[str, Any]:
    """Manifest entry of one built file: path relative to ``home``, sha256, bytes, provenance."""
    return {
        "path": path.relative_to(home).as_posix(),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "provenance": provenance,
    }


def load_manifest(home: Path, strict: bool = False) -> dict[str, Any]:
    """Read ``<home>/manifest.json``; an absent file is an empty manifest.

    An unreadable one raises :class:`ManifestUnreadableError` when ``strict``; otherwise (what a
    build wants) it is logged as a warning and read as empty, so the build rebuilds every
    component and then writes a good manifest over it.
    """
    path = manifest_path(home)
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "components": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        reason = None
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        manifest, reason = None, str(err)
    if reason is None and (
        not isinstance(manifest, dict) or not isinstance(manifest.get("components", {}), dict)
    ):
        reason = "not a JSON object with a `components` object"
    if reason is not None:
        if strict:
            raise ManifestUnreadableError(path, reason)
        stat = path.stat()
        if (str(path), stat.st_mtime_ns, stat.st_size) not in _warned_unreadable:
            _warned_unreadable.add((str(path), stat.st_mtime_ns, stat.st_size))
            logger.warning("%s: unreadable manifest (%s); reading it as empty, so every component "
                           "is rebuilt and a new manifest written.", path, reason)
        return {"format": MANIFEST_FORMAT, "components": {}}
    manifest.setdefault("components", {})
    return manifest


def write_manifest(home: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (temp file + ``os.replace``) so a crash never truncates it."""
    path = manifest_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def record_component(home: Path, name: str, record: dict[str, Any]) -> None:
    """Store (replace) the record of one component, stamping when it was built."""
    manifest = load_manifest(home)
    record = dict(record, built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    manifest.setdefault("components", {})[name] = record
    manifest["format"] = MANIFEST_FORMAT
    write_manifest(home, manifest)


def forget_component(home: Path, name: str) -> None:
    """Drop a component from the manifest (before rebuilding it, so a crash leaves it unbuilt)."""
    manifest = load_manifest(home)
    if manifest.get("components", {}).pop(name, None) is not None:
        write_manifest(home, manifest)


def component_problems(home: Path, name: str, recipe_version: int | None = None) -> list[str]:
    """What is wrong with one built component: missing, stale recipe, missing or changed files."""
    record = load_manifest(home).get("components", {}).get(name)
    if record is None:
        return [f"{name}: not built"]
    problems = []
    if recipe_version is not None and record.get("recipe_version") != recipe_version:
        problems.append(
            f"{name}: built by recipe version {record.get('recipe_version')}, "
            f"this code builds version {recipe_version}"
        )
    for entry in record.get("files", []):
        path = home / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} != {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
    return problems


def verify_manifest(home: Path) -> list[str]:
    """Check every file listed in ``<home>/manifest.json``; return the problems (empty = good).

    Raises :class:`ManifestUnreadableError` (naming the file and the fix) when the manifest
    exists but cannot be read."""
    if not manifest_path(home).is_file():
        return [f"{manifest_path(home)}: missing (nothing built yet)"]
    recorded = load_manifest(home, strict=True)["components"]
    problems = []
    for name in sorted(set(COMPONENTS) | set(recorded)):
        problems.extend(component_problems(home, name))
    return problems
