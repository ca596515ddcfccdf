"""Small, real inputs for the HELMET-style task tests: a byte-level BPE tokenizer trained on the
spot (so unit tests need neither the embedded model nor the corpus), local data files in the
documented schemas, and a model double that answers with the reference summary."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from eval_doubles import OracleLM
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from acadlm_plugins.evaluation.local_data import DEFAULT_QA_FILE, DEFAULT_RERANK_FILE

TOPICS = {
    "weather": ("the rain fell on the hills", "a cold wind came from the north",
                "clouds gathered over the valley", "the morning frost melted by noon",
                "a storm was expected before evening", "the sky cleared after the showers"),
    "sport": ("the striker scored in the last minute", "the team trained on the wet pitch",
              "the runner finished the race in second place", "the coach changed the lineup",
              "the match went to extra time", "the keeper saved a penalty"),
    "cooking": ("the onions were fried until golden", "a pinch of salt went into the soup",
                "the bread rose slowly in the warm kitchen", "the sauce simmered for an hour",
                "the cake cooled on a wire rack", "fresh herbs were chopped for the salad"),
}
NAMES = ("Ada", "Bram", "Cora", "Dov", "Esme", "Fitz", "Gale", "Hugo", "Iris", "Jude")
PLACES = ("harbour", "mill", "orchard", "library", "market", "bridge", "tower", "garden")


def write_tokenizer_dir(folder: Path, *, max_positions: int = 8192) -> Path:
    """A model folder holding a BPE ``tokenizer.json`` trained on our test texts and a
    ``config.json`` with ``max_position_embeddings``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = [DEFAULT_QA_FILE.read_text(encoding="utf-8"),
             DEFAULT_RERANK_FILE.read_text(encoding="utf-8")]
    texts += [" ".join(sentences) for sentences in TOPICS.values()]
    texts.append("0123456789abcdef-{}[]\":, " * 20)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": max_positions}))
    return folder


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write ``rows`` one JSON value a line (strings are written as they are, to make bad
    lines on purpose)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sentences(rng: random.Random, count: int) -> str:
    pool = [s for group in TOPICS.values() for s in group]
    return " ".join(f"{rng.choice(pool).capitalize()} near the {rng.choice(PLACES)}."
                    for _ in range(count))


def icl_rows(count: int = 240, seed: int = 0) -> list[dict[str, str]]:
    """Labelled sentences of three topics (the label is the topic)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = list(TOPICS)[i % len(TOPICS)]
        text = f"{rng.choice(NAMES)} said that {rng.choice(TOPICS[label])} near the " \
               f"{rng.choice(PLACES)} on day {i}."
        rows.append({"text": text, "label": label})
    return rows


def longqa_rows(count: int = 4, words: int = 2500, seed: int = 0) -> list[dict[str, Any]]:
    """Long made-up documents, each stating early on who keeps which key."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        name, place = NAMES[i % len(NAMES)], PLACES[i % len(PLACES)]
        fact = f"The keeper of the {place} key is {name} Quillfeather{i}."
        body = _sentences(rng, 8) + " " + fact + " " + _sentences(rng, words // 8)
        rows.append({"id": f"doc{i}", "document": body,
                     "question": f"Who is the keeper of the {place} key?",
                     "answers": [f"{name} Quillfeather{i}"]})
    return rows


def summ_rows(count: int = 4, words: int = 2500, seed: int = 1) -> list[dict[str, Any]]:
    """Long made-up documents with a one-sentence reference summary."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        rows.append({"id": f"report{i}", "document": _sentences(rng, words // 8),
                     "summary": f"A day of weather, sport and cooking around the "
                                f"{PLACES[i % len(PLACES)]}, told in short notes."})
    return rows


class ReferenceLM(OracleLM):
    """Answers every request with the document's first reference (a perfect summarizer)."""

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self.prompts.extend(request.arguments[0] for request in requests)
        return [request.doc["outputs"][0] for request in requests]
