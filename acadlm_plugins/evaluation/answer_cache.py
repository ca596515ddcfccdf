"""lm-eval's answer cache (``use_cache``), kept apart for every evaluated model.

lm-eval's ``CachingLM`` keys each answer by the request alone (request type, prompt, generation
settings), never by the model: a cache path reused for another checkpoint hands back the first
model's answers as the second's, with no warning, and the scores are the first model's. The eval
recipe and ``acadlm-lm-eval`` therefore append a fingerprint of the model to the path, so each
model (and each change to its files or its model args) gets a cache of its own, while a rerun of
the same model re-uses its answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Model args that do not change the answers (how requests are batched), left out of the key so
#: an interrupted run may resume with another batch size.
IGNORED_ARGS = frozenset({"batch_size", "max_batch_size"})
#: Model args that name local files whose contents the answers depend on.
PATH_ARGS = ("pretrained", "tokenizer")
#: Files of a model folder that make the model: weights, configs, tokenizer, chat template.
MODEL_FILE_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json",
                                 ".jinja", ".model", ".tiktoken", ".txt"})
FINGERPRINT_CHARS = 12


SAMPLED_BYTES = 1 << 20


def _file_state(path: Path) -> list[Any]:
    """Name, size, modification time and a hash of the first and last MiB (a safetensors
    file's header and the end of its data): weights copied over with their old timestamps
    (``cp -p``, ``rsync -t``) change the hash though not the size or time."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(SAMPLED_BYTES))
        if stat.st_size > SAMPLED_BYTES:
            handle.seek(max(SAMPLED_BYTES, stat.st_size - SAMPLED_BYTES))
            digest.update(handle.read(SAMPLED_BYTES))
    return [path.name, stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def _local_state(value: Any) -> dict[str, Any] | None:
    """What a local model folder (or file) holds: its resolved path, the bytes of its
    ``config.json`` and the name, size, modification time and sampled hash of each model file
    (:func:`_file_state`); None for a
    value that is not a local path (a hub name: the name itself is in the args)."""
    if not isinstance(value, (str, Path)) or not str(value):
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return None
    path = path.resolve()
    if path.is_file():
        return {"path": str(path), "files": [_file_state(path)]}
    config = path / "config.json"
    return {"path": str(path),
            "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "files": [_file_state(item) for item in sorted(path.iterdir())
                      if item.is_file() and item.suffix in MODEL_FILE_SUFFIXES]}


def model_fingerprint(model: str, model_args: Mapping[str, Any],
                      device: str | None = None) -> str:
    """A short hash of what the answers depend on besides the request: the lm-eval model name,
    its args (dtype, max_length, ...; not the batch size), the device (it picks the default
    dtype) and the local folders of ``pretrained``/``tokenizer`` (:func:`_local_state`)."""
    files = {key: _local_state(model_args.get(key)) for key in PATH_ARGS}
    payload = {
        "model": model,
        "device": "" if device is None else str(device),
        # A local path is keyed by the folder it resolves to (in ``files``), not its spelling.
        "args": {str(key): str(value) for key, value in sorted(model_args.items())
                 if key not in IGNORED_ARGS and files.get(key) is None},
        "files": files,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def model_cache_path(use_cache: str | None, model: str, model_args: Mapping[str, Any],
                     device: str | None = None) -> str | None:
    """``use_cache`` with the model's fingerprint appended (``<use_cache>_<fingerprint>``;
    lm-eval adds ``_rank<N>.db``), or ``use_cache`` unchanged when no cache is asked for."""
    if not use_cache:
        return use_cache
    return f"{use_cache}_{model_fingerprint(model, model_args, device)}"
