"""Filler text for long-context prompts, read from local files only.

RULER hides its needles in three kinds of haystack; ours are built without a download:
``noise`` repeats a few plain sentences, ``prose`` is real text (by default the books of the
embedded corpus, or any local text the user names with ``haystack_path``), ``needle`` is made of
distractor needles by the task itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from acadlm_plugins.evaluation.lengths import task_error

NOISE_SENTENCES = (
    "The river keeps its own slow pace. The hills are quiet in the evening. "
    "A lamp is lit in the window. The road goes on and comes back again."
)
_WORD_RE = re.compile(r"\S+")


def _texts_from_file(path: Path, *, task: str) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix != ".jsonl":
        raise task_error(task, "haystack_path", f"{path} is neither .txt nor .jsonl.",
                         "Give a text file, a jsonl file with a `text` field, or a folder of them.")
    from acadlm_plugins.evaluation.local_data import iter_json_objects, text_field

    example = '{"text": "..."}'
    return [text_field(row, path, number, task=task, key="haystack_path")
            for number, row in iter_json_objects(path, task=task, key="haystack_path",
                                                 example=example)]


_WORDS_BY_SOURCE: dict[str, tuple[str, ...]] = {}


def _load_words(source: str, task: str) -> tuple[str, ...]:
    """Words of a haystack source, read once per process (every task of a suite shares them);
    ``task`` only names the task in errors."""
    if source in _WORDS_BY_SOURCE:
        return _WORDS_BY_SOURCE[source]
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) \
        if path.is_dir() else [path]
    words: list[str] = []
    for file in files:
        for text in _texts_from_file(file, task=task):
            words.extend(_WORD_RE.findall(text))
    if len(_WORDS_BY_SOURCE) >= 4:
        _WORDS_BY_SOURCE.pop(next(iter(_WORDS_BY_SOURCE)))
    _WORDS_BY_SOURCE[source] = tuple(words)
    return _WORDS_BY_SOURCE[source]


def default_prose_source() -> Path:
    """The long books of the embedded corpus (Shakespeare, Milton, Botchan)."""
    from acadlm_plugins.defaults.paths import require_default_corpus

    return require_default_corpus() / "long" / "books.jsonl"


def prose_words(haystack_path: str | None, *, task: str, min_words: int) -> tuple[str, ...]:
    """Words of the prose haystack, whitespace-normalized, at least ``min_words`` of them."""
    if haystack_path:
        source = Path(haystack_path).expanduser()
        if not source.exists():
            raise task_error(task, "haystack_path", f"{source} does not exist.",
                             "Give a local .txt/.jsonl file or folder, or leave it unset for the "
                             "embedded corpus.")
    else:
        source = default_prose_source()
    words = _load_words(str(source.resolve()), task)
    if not words:
        raise task_error(task, "haystack_path", f"{source} holds no text.", "Give a file with text.")
    if len(words) < min_words:
        repeats = -(-min_words // len(words))
        words = words * repeats
    return words


def noise_words(min_words: int) -> tuple[str, ...]:
    """The ``noise`` haystack: the same few sentences repeated."""
    unit = NOISE_SENTENCES.split()
    return tuple(unit * (-(-min_words // len(unit))))
