"""Context lengths and the tokenizer that measures them, taken from lm-eval's task metadata.

lm-eval hands every task the parsed ``--model_args`` merged with ``--metadata``. Our long-context
tasks read from it the lengths to build (``max_seq_lengths``), the tokenizer that measures them
(``tokenizer``, else ``pretrained``: always a local path, never a hub name) and, from the model
directory's ``config.json``, the longest context the model can take.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.task_settings import declare_settings
from acadlm_plugins.training.config_checks import config_value

DEFAULT_LENGTHS: tuple[int, ...] = (4096, 8192, 16384)
TOKENIZER_KEYS = ("tokenizer", "pretrained")
#: The model arguments that give the longest context the model takes, in order.
MAX_LENGTH_KEYS = ("max_length", "max_seq_len")


def task_error(task: str, field: str, problem: str, fix: str = "") -> ConfigError:
    """A :class:`ConfigError` whose key names the task and the metadata field at fault."""
    return ConfigError(f"{task}: {field}", problem, fix)


def parse_lengths(value: Any, *, task: str = "acadlm") -> list[int]:
    """Normalize ``max_seq_lengths`` (list, int, or "1024,2048" / "1k,2k" string) to sorted ints."""
    if value is None:
        return list(DEFAULT_LENGTHS)
    items = value.replace(" ", "").split(",") if isinstance(value, str) else value
    if isinstance(items, (int, float)):
        items = [items]
    lengths: list[int] = []
    for item in items:
        text = str(item).strip().lower()
        try:
            number = float(text[:-1]) * 1024 if text.endswith("k") else float(text)
            if not number.is_integer():
                raise ValueError(text)
            length = int(number)
        except ValueError:
            raise task_error(task, "max_seq_lengths", f"{item!r} is not a length.",
                             'Give token counts, e.g. --metadata \'{"max_seq_lengths": [1024, 4096]}\'.'
                             ) from None
        if length < 256:
            raise task_error(task, "max_seq_lengths", f"{length} is too short for a long-context "
                             "task (minimum 256 tokens).", "Use lengths of 256 tokens or more.")
        lengths.append(length)
    if not lengths:
        raise task_error(task, "max_seq_lengths", "the list is empty.", "Name at least one length.")
    return sorted(set(lengths))


@dataclass(frozen=True)
class LengthTokenizer:
    """The evaluated model's tokenizer, used only to count and cut text (no special tokens)."""

    tokenizer: Tokenizer
    source: str

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@lru_cache(maxsize=8)
def _load_tokenizer_file(path: str) -> Tokenizer:
    """The tokenizer at ``path``, with any truncation/padding its file enables switched off
    (a truncating tokenizer would under-count every long context)."""
    from acadlm_plugins.models.tokenizer import disable_truncation_and_padding

    tokenizer = Tokenizer.from_file(path)
    disable_truncation_and_padding(tokenizer, path)
    return tokenizer


def tokenizer_file(path: str | Path) -> Path | None:
    """The ``tokenizer.json`` at ``path`` (a file, or a directory holding one), or None."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return path
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    return None


def load_length_tokenizer(metadata: Mapping[str, Any], *, task: str) -> LengthTokenizer:
    """The tokenizer named by ``tokenizer`` or ``pretrained`` in ``metadata`` (a local path)."""
    for key in TOKENIZER_KEYS:
        value = metadata.get(key)
        if not isinstance(value, str) or not value:
            continue
        found = tokenizer_file(value)
        if found is None:
            raise task_error(task, key, f"{value!r} is not a local tokenizer.json or a directory "
                             "holding one; long-context tasks size their prompts with the "
                             "evaluated model's tokenizer and never download one.",
                             "Point `pretrained=`/`tokenizer=` in --model_args at a local model "
                             "directory (for example an exported checkpoint).")
        return LengthTokenizer(_load_tokenizer_file(str(found.resolve())), str(found))
    raise task_error(task, "tokenizer", "no tokenizer to measure context lengths with.",
                     "Pass `--model_args pretrained=<local model dir>` (or tokenizer=<dir>).")


def model_max_length(metadata: Mapping[str, Any]) -> int | None:
    """The longest context the evaluated model takes: ``max_length`` in the model args, else
    ``max_position_embeddings`` from the model directory's config.json; None if unknown. A
    ``max_length`` that is not a positive integer (``4k``, ``0``) is an error naming it."""
    for key in MAX_LENGTH_KEYS:
        if metadata.get(key) is not None:
            return max_length_setting(metadata, key)
    pretrained = metadata.get("pretrained")
    if isinstance(pretrained, str) and (Path(pretrained).expanduser() / "config.json").is_file():
        config = json.loads((Path(pretrained).expanduser() / "config.json").read_text())
        value = config.get("max_position_embeddings")
        return int(value) if value else None
    return None


def max_length_setting(metadata: Mapping[str, Any], key: str) -> int | None:
    """``metadata[key]`` (a model argument: ``max_length`` or ``max_seq_len``) as a positive
    integer, None when unset; ``4k`` or ``0`` is an error naming ``--model_args <key>``."""
    if metadata.get(key) is None:
        return None
    return config_value(metadata[key], f"--model_args {key}", int, minimum=1)


def check_lengths_fit(lengths: list[int], metadata: Mapping[str, Any], *, task: str) -> None:
    """Refuse, before any prompt is built, lengths the model cannot represent."""
    limit = model_max_length(metadata)
    if limit is None:
        return
    too_long = [length for length in lengths if length > limit]
    if too_long:
        raise task_error(task, "max_seq_lengths", f"{too_long} exceed the model's maximum context "
                         f"of {limit} tokens.", f"Evaluate at lengths <= {limit}, or extend the "
                         "model's context first (recipes/prolong).")


# The keys read above (every task): the tokenizer that measures lengths and the longest
# context the model takes, model arguments that lm-eval merges into the metadata.
declare_settings("every task (model arguments)", {
    **dict.fromkeys(TOKENIZER_KEYS),  # a local path when read; a model object from Python
    **{key: lambda metadata, task, key=key: max_length_setting(metadata, key)
       for key in MAX_LENGTH_KEYS},
})
