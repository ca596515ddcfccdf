"""Chat SFT data for ProLong's last stage: short instruction conversations in UltraChat's schema.

ProLong (Gao et al., 2024) ends long-context training with a short supervised fine-tuning stage
on UltraChat: only the assistant turns are trained and the loss is averaged over all trained
tokens of a step (not per conversation), which is what torchtune's stock
``full_finetune_single_device`` recipe already does. So this module only reads local jsonl rows
of the form::

    {"prompt": "...", "prompt_id": "...",
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

checks every row up front (a bad row should stop the run before the model loads, with its file
and line, not deep inside a dataloader worker), and hands the files to torchtune's own
``chat_dataset`` with the OpenAI message style: torchtune turns rows into messages, the model
tokenizer renders and masks them, and truncates them to its ``max_seq_len``. A conversation whose
trained tokens all lie beyond that length would reach the recipe with every label -100, and a
step of only such conversations divides a zero loss by zero trained tokens (NaN loss and
weights), so it is dropped before training, with a warning that counts them (see
:func:`ultrachat_dataset`). Use it from a stock config with::

    dataset:
      _component_: acadlm_plugins.data.sft.ultrachat_dataset
      data_files: null        # the small example set shipped with the package
      train_on_input: False   # system/user tokens get label -100
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import load_dataset
from torchtune.data import OpenAIToMessages
from torchtune.datasets import PackedDataset, SFTDataset, chat_dataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from acadlm_plugins.data.documents import (
    iter_jsonl_lines,
    json_error_text,
    resolve_data_files,
)
from acadlm_plugins.errors import ConfigError, DataError

SHIPPED_EXAMPLES = Path(__file__).with_name("sft") / "ultrachat_examples.jsonl"
ROLES = ("system", "user", "assistant")
_FIELD = "dataset.data_files"

log = logging.getLogger(__name__)


def ultrachat_dataset(
    tokenizer: ModelTokenizer,
    *,
    data_files: str | Sequence[str] | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    split: str = "train",
) -> SFTDataset | PackedDataset:
    """An SFT dataset of UltraChat-style conversations from local jsonl files.

    Args:
        tokenizer: the model tokenizer (it renders the chat format, masks turns and truncates
            to its ``max_seq_len``).
        data_files: jsonl files, directories of them or globs; ``None`` means the example set
            shipped with the package (:data:`SHIPPED_EXAMPLES`, 40 short conversations).
        train_on_input: also train on system and user tokens. ``False`` (ProLong's choice)
            gives them label -100, so only assistant turns contribute to the loss.
        packed: pack conversations into ``tokenizer.max_seq_len``-token sequences with
            torchtune's ``PackedDataset`` (the config's collate then becomes the packed one).
        split: ``split`` of ``datasets.load_dataset``, e.g. ``"train[:20]"`` for a subset.

    Returns:
        torchtune's ``SFTDataset`` (``PackedDataset`` when ``packed``); each sample has
        ``tokens``, ``mask`` and ``labels``. With a tokenizer ``max_seq_len``, conversations
        that keep no trained token once truncated to it (all their assistant turns lie beyond
        it) are left out, and a warning says how many of how many; the others are unchanged.

    Raises:
        DataError: a file is missing or not jsonl, or a row (named by file and line) is not a
            valid conversation; see :func:`check_ultrachat_file`. Also when no conversation
            keeps a trained token within ``tokenizer.max_seq_len``.
        ConfigError: ``packed`` without a tokenizer ``max_seq_len``.
    """
    files = resolve_data_files(SHIPPED_EXAMPLES if data_files is None else data_files,
                               field=_FIELD)
    for file in files:
        if file.suffix != ".jsonl":
            raise DataError(f"`{_FIELD}`: {file} is not a .jsonl file. Fix: give one JSON "
                            "object per line in UltraChat's schema ({\"messages\": [...]}).")
        check_ultrachat_file(file)
    if packed and getattr(tokenizer, "max_seq_len", None) is None:
        raise ConfigError("dataset.packed", "packing needs the length to pack to, and the "
                          "tokenizer has no max_seq_len.", "set `tokenizer.max_seq_len`, or "
                          "`dataset.packed: False`.")
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
    filter_fn = None if max_seq_len is None else _keeps_trained_tokens(tokenizer, train_on_input)
    paths = [str(f) for f in files]
    # Packed below, as chat_dataset packs, so that the kept conversations can be counted first.
    dataset = chat_dataset(tokenizer, source="json", data_files=paths,
                           conversation_column="messages", conversation_style="openai",
                           train_on_input=train_on_input, packed=False, split=split,
                           filter_fn=filter_fn)
    if filter_fn is not None:
        _report_dropped(len(load_dataset("json", data_files=paths, split=split)), len(dataset),
                        max_seq_len)
    return PackedDataset(dataset, max_seq_len=max_seq_len) if packed else dataset


def _keeps_trained_tokens(tokenizer: ModelTokenizer, train_on_input: bool):
    """A ``filter_fn`` for ``chat_dataset``: whether a raw row, rendered, masked and truncated
    exactly as the dataset will render it, keeps at least one trained token (label != -100)."""
    to_messages = OpenAIToMessages(train_on_input=train_on_input,
                                   column_map={"messages": "messages"})

    def keeps_trained_tokens(row: dict[str, Any]) -> bool:
        return not all(tokenizer(to_messages(row))["mask"])  # mask True = label -100

    return keeps_trained_tokens


def _report_dropped(total: int, kept: int, max_seq_len: int) -> None:
    """Warn about conversations left out for want of trained tokens; raise if none is left."""
    if kept == total:
        return
    why = (f"keep no trained token once truncated to `tokenizer.max_seq_len` ({max_seq_len} "
           "tokens): all their assistant turns lie beyond it")
    if kept == 0:
        raise DataError(f"`{_FIELD}`: none of the {total} conversations is left to train on; "
                        f"all {why}. Fix: raise `tokenizer.max_seq_len`, or give shorter "
                        "conversations.")
    log.warning("SFT data: dropped %d of %d conversations that %s, and a step of only such "
                "conversations has a NaN loss. Raise `tokenizer.max_seq_len` to keep them.",
                total - kept, total, why)


def check_ultrachat_file(file: Path) -> int:
    """Check every line of a jsonl file against UltraChat's schema; return the row count.

    Blank lines are allowed. A row must be a JSON object whose ``messages`` is a list of
    ``{"role", "content"}`` objects: roles ``system`` (first only), then ``user`` and
    ``assistant`` alternating, starting with ``user`` and ending with ``assistant``, every
    content a non-empty string. ``prompt`` and ``prompt_id``, when present, must be strings.

    Raises:
        DataError: naming ``file:line`` and what is wrong, for the first bad row, or for a
            file without any conversation.
    """
    rows = 0
    for line_no, line in iter_jsonl_lines(file):
        if not line.strip():
            continue
        where = f"{file}:{line_no}"
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: {json_error_text(err)}. "
                            "Fix: one JSON object per line.") from None
        check_ultrachat_row(row, where)
        rows += 1
    if rows == 0:
        raise DataError(f"{file}: holds no conversation. Fix: one JSON object per line with a "
                        "`messages` list.")
    return rows


def check_ultrachat_row(row: Any, where: str) -> None:
    """Raise :class:`DataError` prefixed with ``where`` unless ``row`` is a valid conversation
    (see :func:`check_ultrachat_file` for the rules)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    for key in ("prompt", "prompt_id"):
        if key in row and not isinstance(row[key], str):
            raise DataError(f"{where}: `{key}` is {type(row[key]).__name__}; UltraChat's "
                            "schema has a string there.")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        found = "has no `messages`" if messages is None else "has an empty or non-list `messages`"
        raise DataError(f"{where}: the row {found} (keys: {sorted(row)}). Fix: "
                        "`messages: [{\"role\": \"user\", \"content\": ...}, ...]`.")
    expected = "user"
    for index, message in enumerate(messages):
        at = f"{where}: messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} is {type(message).__name__}, not a {{role, content}} object.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(content, str) or not content.strip():
            problem = "is empty" if isinstance(content, str) else (
                "is missing" if content is None else f"is {type(content).__name__}, not a string")
            raise DataError(f"{at}: the {role} content {problem}.")
        if role == "system":
            if index != 0:
                raise DataError(f"{at}: a system message may only come first.")
            continue
        if role != expected:
            raise DataError(f"{at}: expected role {expected!r}, got {role!r}; turns must "
                            "alternate user, assistant, user, ...")
        expected = "assistant" if role == "user" else "user"
    if expected != "user" or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {messages[-1]['role']} turn; "
                        "it must end with the assistant's answer.")
