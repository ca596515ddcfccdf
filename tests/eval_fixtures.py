"""Small but real inputs for the long-context task tests: a prose haystack text file, a
byte-level BPE tokenizer trained on it, and a model folder whose config.json states the longest
context the "model" takes. Everything is written into a temporary folder in well under a
second, so the task tests need neither the embedded SmolLM2 model nor its corpus.
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Plain words of the test haystack. "know" is left out on purpose: the constant test model
#: answers "I do not know." and no answer word should be found inside it.
HAYSTACK_WORDS = (
    "the", "a", "of", "and", "to", "in", "on", "at", "by", "with", "from", "over", "under",
    "near", "after", "before", "while", "river", "hill", "valley", "forest", "meadow", "garden",
    "village", "harbour", "bridge", "tower", "market", "window", "lantern", "candle", "kettle",
    "basket", "blanket", "ladder", "wagon", "barrel", "anchor", "compass", "pebble", "feather",
    "thread", "needle", "morning", "evening", "winter", "summer", "autumn", "spring", "weather",
    "season", "shadow", "silence", "journey", "story", "letter", "answer", "promise", "reason",
    "moment", "number", "walked", "carried", "gathered", "counted", "mended", "painted",
    "followed", "watched", "opened", "closed", "waited", "listened", "wandered", "gentle",
    "quiet", "narrow", "heavy", "bright", "golden", "silver", "ancient", "patient", "careful",
    "sudden", "distant", "crooked", "hollow", "little", "old", "keeper", "baker", "weaver",
    "miller", "sailor", "farmer", "teacher", "traveller", "neighbour", "daughter", "cousin",
)
#: Longest sentence of the test haystack, in words: an insert moved back to the end of the
#: sentence before its depth moves at most this far.
MAX_SENTENCE_WORDS = 14
EVAL_MAX_POSITIONS = 4096


def haystack_text(num_sentences: int = 300, seed: int = 0) -> str:
    """Seeded prose of ``num_sentences`` sentences (5 to :data:`MAX_SENTENCE_WORDS` words each,
    commas now and then), in paragraphs of eight sentences."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(HAYSTACK_WORDS) for _ in range(rng.randint(5, MAX_SENTENCE_WORDS))]
        if len(words) > 7 and rng.random() < 0.3:
            words[3] += ","
        sentences.append(" ".join(words).capitalize() + ".")
    paragraphs = [" ".join(sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    return "\n\n".join(paragraphs) + "\n"


def write_eval_tokenizer(model_dir: Path, corpus: str, *, vocab_size: int = 600,
                         max_position_embeddings: int = EVAL_MAX_POSITIONS) -> Path:
    """A model folder holding a byte-level BPE ``tokenizer.json`` trained on ``corpus`` and a
    ``config.json`` with ``max_position_embeddings`` (what the max-length check reads).

    Byte-level BPE like SmolLM2's: every string encodes, digits and capitals the corpus never
    merged cost a token each, so UUIDs and variable names are as expensive as for a real
    digit-splitting tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {"model_type": "llama", "max_position_embeddings": max_position_embeddings}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model_dir


@dataclass(frozen=True)
class EvalFiles:
    """The tiny model folder and haystack file of a test module, and task metadata for them."""

    model_dir: Path
    haystack: Path

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """lm-eval task metadata (as merged from --model_args and --metadata) for these files."""
        return {"pretrained": str(self.model_dir), "haystack_path": str(self.haystack), **extra}


def write_eval_files(root: Path) -> EvalFiles:
    """Write the haystack ``hay.txt`` and the tokenizer folder ``model`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    text = haystack_text()
    haystack = root / "hay.txt"
    haystack.write_text(text)
    return EvalFiles(write_eval_tokenizer(root / "model", text), haystack)


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail, instead of hanging, when the block runs longer than ``seconds``."""
    def expire(*_: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
