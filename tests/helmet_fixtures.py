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
    trainer = trainers.BpeTrainer(vocab_size=2000, show_progress=False,
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


def choice_rows(count: int = 4, words: int = 2500, seed: int = 5) -> list[dict[str, Any]]:
    """Long made-up documents with a four-option question (InfiniteBench En.MC's converted
    form): the document states early on where a named person went; the options are places."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        name = f"{NAMES[i % len(NAMES)]} Brackenby{i}"
        options = [f"the {place} of ward {i}" for place in PLACES[i % 4: i % 4 + 4]]
        answer = options[i % 4]
        body = (_sentences(rng, 8) + f" After the storm {name} walked to {answer}. "
                + _sentences(rng, words // 8))
        rows.append({"id": str(i), "document": body, "question": f"Where did {name} walk?",
                     "options": options, "answer": answer})
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


# ------------------------------------------------------------------------ ALCE (cite) fixture
# A tiny stand-in for ALCE's ASQA and QAMPARI files, in ALCE's own JSON format, for tests only:
# the real files are not shipped and cannot be downloaded here.

def _alce_docs(rng: random.Random, facts: list[str], count: int) -> list[dict[str, str]]:
    """``count`` retrieved passages; the first ones state ``facts``, one each."""
    docs = []
    for i in range(count):
        fact = facts[i] + " " if i < len(facts) else ""
        docs.append({"title": f"{rng.choice(PLACES).title()} records {i}",
                     "text": fact + _sentences(rng, 4)})
    return docs


def asqa_items(count: int = 12, docs: int = 8, seed: int = 2) -> list[dict[str, Any]]:
    """ASQA items: an ambiguous question with two sub-questions, each with short answers."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        place = PLACES[i % len(PLACES)]
        first, second = f"Zorvath{i}", f"Quenby{i}"
        facts = [f"The old keeper of the {place} was {first}.",
                 f"The new keeper of the {place} is {second}."]
        items.append({
            "sample_id": f"asqa{i}", "question": f"Who is the keeper of the {place} number {i}?",
            "qa_pairs": [{"question": "old keeper?", "short_answers": [first, f"{first} Sr"]},
                         {"question": "new keeper?", "short_answers": [second]}],
            "answer": f"The old keeper was {first}; the new keeper is {second}.",
            "annotations": [{"long_answer": f"It was {first}, and now it is {second}."}],
            "docs": _alce_docs(rng, facts, docs)})
    return items


def qampari_items(count: int = 12, docs: int = 8, seed: int = 3) -> list[dict[str, Any]]:
    """QAMPARI items: a question with three answers (the first with an alias)."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        place = PLACES[i % len(PLACES)]
        names = [f"Brindle{i}", f"Caskett{i}", f"Dorwin{i}"]
        facts = [f"{name} once worked at the {place}." for name in names]
        items.append({"id": f"qampari{i}", "question": f"Who worked at the {place} number {i}?",
                      "answers": [[names[0], f"{names[0]} Jr"], [names[1]], [names[2]]],
                      "docs": _alce_docs(rng, facts, docs)})
    return items


def alce_prompt_file(path: Path, *, qampari: bool) -> Path:
    """An ALCE prompt file (instruction and hand-written demonstrations with citations)."""
    demos = [{"question": "Who built the mill?",
              "answer": ("Ada Quill [1], Bram Oak [2]." if qampari else
                         "The mill was built by Ada Quill [1] and rebuilt by Bram Oak [2]."),
              "docs": [{"title": "Mill", "text": "Ada Quill built the mill."},
                       {"title": "Mill repairs", "text": "Bram Oak rebuilt the mill."}]},
             {"question": "Who painted the tower?",
              "answer": "Cora Lane [1]." if qampari else "Cora Lane painted the tower [1].",
              "docs": [{"title": "Tower", "text": "Cora Lane painted the tower."}]}]
    path.write_text(json.dumps({"instruction": "Instruction: answer and cite.",
                                "demo_sep": "\n\n\n", "demos": demos}), encoding="utf-8")
    return path


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as one JSON document (ALCE releases its data as a JSON list)."""
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def distractor_text(path: Path, paragraphs: int = 400, seed: int = 4) -> Path:
    """A plain-text file of made-up paragraphs for ``distractor_path``: passages for the
    QA/RAG/re-ranking/cite tasks once their own data runs out (instead of the corpus)."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(_sentences(rng, 8) for _ in range(paragraphs)) + "\n",
                    encoding="utf-8")
    return path


def write_tiny_nli_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A randomly initialised one-layer T5 with our test tokenizer, saved like a downloaded NLI
    model: enough to prove that a local model directory loads and answers, offline."""
    import torch
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "</s>"})
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1,
                      num_decoder_layers=1, num_heads=2, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
