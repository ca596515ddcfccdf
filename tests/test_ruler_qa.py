"""RULER's QA tasks, ``acadlm_qa_1`` (SQuAD) and ``acadlm_qa_2`` (HotpotQA), on tiny files in
the converted format (and one pair converted from the published formats by
``acadlm-eval-data``'s own code), sized with the small BPE tokenizer of ``eval_fixtures``.

Checked: the gold paragraphs are in every prompt; the distractors come as RULER takes them (the
question's own paragraphs first, other questions' only once all of those are in); prompts fill
99-100% of the RULER budget; a file too small for a length is refused, never shortened; the
score is RULER's string-match-part, by hand and through lm-eval.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from eval_doubles import CHAT_TEMPLATE, BlankLineFirstOracleLM, ConstantLM, OracleLM
from eval_fixtures import HAYSTACK_WORDS, EvalFiles, write_eval_files

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import task_manager
from acadlm_plugins.evaluation.lengths import LengthTokenizer, load_length_tokenizer
from acadlm_plugins.evaluation.ruler import TOKENS_TO_GENERATE, PromptFrame
from acadlm_plugins.evaluation.ruler_qa import (
    QA_ANSWER,
    QA_DOCUMENT,
    QA_HEAD,
    QA_TAIL,
    hotpotqa_dataset,
    squad_dataset,
)
from acadlm_plugins.evaluation.task_base import process_results_match_part

LENGTHS = [1024, 2048]
QA_TASKS = ["acadlm_qa_1", "acadlm_qa_2"]
DOCUMENT_START = re.compile(r"(?:^|\n\n)Document (\d+):\n")


def _paragraph(rng: random.Random, words: int = 45) -> str:
    return " ".join(rng.choice(HAYSTACK_WORDS) for _ in range(words)).capitalize() + "."


def squad_rows(articles: int = 8, paragraphs: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """Rows as ``acadlm-eval-data convert squad`` writes them: one per question, its paragraph
    gold, the other paragraphs of its article as distractors. Each paragraph names its own
    keeper, the answer to its question."""
    rng = random.Random(seed)
    rows = []
    for a in range(articles):
        texts = [f"{_paragraph(rng)} The keeper was named Quill{a}x{p}."
                 for p in range(paragraphs)]
        for p, text in enumerate(texts):
            rows.append({"id": f"s{a}.{p}", "question": f"Who kept lamp {a}.{p}?",
                         "answers": [f"Quill{a}x{p}", f"keeper Quill{a}x{p}"],
                         "gold": [{"title": f"Article {a}", "text": text}],
                         "distractors": [{"title": f"Article {a}", "text": other}
                                         for other in texts if other != text]})
    return rows


def hotpot_rows(count: int = 24, seed: int = 1) -> list[dict[str, Any]]:
    """Rows as ``acadlm-eval-data convert hotpotqa`` writes them: two supporting paragraphs
    gold, the three other paragraphs of the question's context as distractors."""
    rng = random.Random(seed)
    rows = []
    for q in range(count):
        paragraphs = [{"title": f"Place {q}-{k}", "text": _paragraph(rng, 35)} for k in range(5)]
        paragraphs[1]["text"] += f" Its bell was cast by Vell{q}."
        rows.append({"id": f"h{q}", "question": f"Who cast the bell of place {q}?",
                     "answers": [f"Vell{q}"], "gold": paragraphs[:2],
                     "distractors": paragraphs[2:]})
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> EvalFiles:
    """The tiny tokenizer folder (max_position_embeddings 4096)."""
    return write_eval_files(tmp_path_factory.mktemp("ruler_qa"))


@pytest.fixture(scope="module")
def data(files: EvalFiles) -> dict[str, Path]:
    root = files.model_dir.parent
    return {"squad": write_rows(root / "squad.jsonl", squad_rows()),
            "hotpot": write_rows(root / "hotpot.jsonl", hotpot_rows()),
            "small": write_rows(root / "small.jsonl", squad_rows(articles=3, paragraphs=5))}


def qa_metadata(files: EvalFiles, data: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return files.metadata(squad_path=str(data["squad"]), hotpotqa_path=str(data["hotpot"]),
                          **extra)


BUILDERS = {"acadlm_qa_1": squad_dataset, "acadlm_qa_2": hotpotqa_dataset}
SOURCE_ROWS = {"acadlm_qa_1": squad_rows, "acadlm_qa_2": hotpot_rows}


def build(files: EvalFiles, data: dict[str, Path], task: str,
          **extra: Any) -> list[dict[str, Any]]:
    return BUILDERS[task](**qa_metadata(files, data, **extra))["test"].to_list()


@pytest.fixture(scope="module")
def sized(files: EvalFiles, data: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Both tasks at 512, 1K and 2K tokens, three questions each."""
    return {task: build(files, data, task, max_seq_lengths=[512, *LENGTHS], num_samples=3)
            for task in QA_TASKS}


def plain_prompt(row: dict[str, Any]) -> str:
    return PromptFrame(0).lay_out(row["input"], row["gen_prefix"])


def documents_of(row: dict[str, Any]) -> list[str]:
    """The texts of a prompt's ``Document i:`` blocks, checked to be numbered 1, 2, ..."""
    question = QA_TAIL.format(question=row["question"])
    assert row["input"].startswith(QA_HEAD) and row["input"].endswith(question)
    context = row["input"][len(QA_HEAD):len(row["input"]) - len(question)]
    pieces = DOCUMENT_START.split(context)
    assert pieces[0] == ""
    numbers, texts = pieces[1::2], pieces[2::2]
    assert numbers == [str(i) for i in range(1, len(texts) + 1)]
    return texts


def shown_text(passage: dict[str, str], task: str) -> str:
    """A converted passage as its document shows it: HotpotQA under its title line."""
    return f"{passage['title']}\n{passage['text']}" if task == "acadlm_qa_2" else passage["text"]


@pytest.mark.parametrize("task", QA_TASKS)
def test_gold_paragraphs_are_in_every_prompt_whole(sized, task: str) -> None:
    rows = SOURCE_ROWS[task]()
    for row in sized[task]:
        source = rows[row["index"]]  # RULER asks the file's questions in order
        assert row["record_id"] == source["id"] and row["outputs"] == source["answers"]
        texts = documents_of(row)
        for passage in source["gold"]:
            assert texts.count(shown_text(passage, task)) == 1
        gold_at = [i for i, kind in enumerate(row["document_kinds"]) if kind == "gold"]
        assert len(gold_at) == len(source["gold"]) and row["cut_document"] - 1 not in gold_at


@pytest.mark.parametrize("task", QA_TASKS)
def test_distractors_follow_rulers_order(sized, task: str) -> None:
    """RULER's qa.py: gold, then the question's own other paragraphs (a random subset when not
    all fit), then paragraphs of other questions. Every document is shown once."""
    rows = SOURCE_ROWS[task]()
    for row in sized[task]:
        source = rows[row["index"]]
        own = {shown_text(p, task) for p in source["distractors"]}
        gold = {shown_text(p, task) for p in source["gold"]}
        texts, kinds = documents_of(row), row["document_kinds"]
        assert len(texts) == len(kinds) and len(set(texts)) == len(texts)
        for number, (text, kind) in enumerate(zip(texts, kinds), start=1):
            if number == row["cut_document"]:
                continue  # a prefix of its paragraph, checked below
            assert (text in gold, text in own) == (kind == "gold", kind == "own"), (number, kind)
        if "other" in kinds:
            assert kinds.count("own") == len(own)  # all own paragraphs before any other
    long = [row for row in sized[task] if row["max_length"] == 2048]
    assert all(row["document_kinds"].count("other") >= 5 for row in long)


def test_a_short_prompt_takes_a_random_part_of_the_articles_own_paragraphs(sized) -> None:
    """At 512 tokens a SQuAD prompt holds only some of the five other paragraphs of its
    article (RULER: ``random.sample(more_context, ...)``), and no other article's."""
    rows = squad_rows()
    short = [row for row in sized["acadlm_qa_1"] if row["max_length"] == 512]
    for row in short:
        assert "other" not in row["document_kinds"]
        assert 0 < row["document_kinds"].count("own") < len(rows[row["index"]]["distractors"])


@pytest.mark.parametrize("task", QA_TASKS)
def test_the_cut_document_is_a_prefix_of_a_paragraph_of_the_file(sized, task: str) -> None:
    every = {shown_text(p, task) for row in SOURCE_ROWS[task]()
             for p in (*row["gold"], *row["distractors"])}
    for row in sized[task]:
        if row["cut_document"]:
            cut = documents_of(row)[row["cut_document"] - 1]
            assert cut not in every and any(text.startswith(cut) for text in every)


@pytest.mark.parametrize("task", QA_TASKS)
def test_prompts_fill_the_ruler_budget_within_one_percent(files: EvalFiles, sized,
                                                          task: str) -> None:
    """RULER's budget: prompt + 32 generated tokens <= L (this tokenizer adds no special
    tokens), and from 1K tokens on (the sizing contract) the prompt fills at least 99% of what
    is left."""
    tokenizer = load_length_tokenizer(files.metadata(), task=task)
    for row in sized[task]:
        if row["max_length"] < 1024:
            assert row["input_tokens"] <= row["budget_tokens"]
            continue
        assert row["tokens_to_generate"] == TOKENS_TO_GENERATE["qa"] == 32
        assert row["budget_tokens"] == row["max_length"] - 32
        assert tokenizer.count(plain_prompt(row)) == row["input_tokens"]
        assert 0.99 * row["budget_tokens"] <= row["input_tokens"] <= row["budget_tokens"]


def test_prompt_budget_fits_the_prompt_alone(files: EvalFiles, data: dict[str, Path]) -> None:
    tokenizer = load_length_tokenizer(files.metadata(), task="t")
    for row in build(files, data, "acadlm_qa_1", max_seq_lengths=[1024], num_samples=2,
                     length_budget="prompt"):
        assert row["budget_tokens"] == 1024
        assert 0.99 * 1024 <= tokenizer.count(plain_prompt(row)) <= 1024


def test_chat_template_tokens_count_in_the_budget(files: EvalFiles, data: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """With ``apply_chat_template`` the user turn, the assistant header and the answer prefix
    after it fit the length with the 32 generated tokens, as for the other RULER tasks."""
    model = tmp_path / "chat_model"
    shutil.copytree(files.model_dir, model)
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    metadata = qa_metadata(EvalFiles(model, files.haystack), data, max_seq_lengths=[1024],
                           num_samples=2, apply_chat_template=True)
    tokenizer = load_length_tokenizer(metadata, task="t")
    for row in hotpotqa_dataset(**metadata)["test"].to_list():
        prompt = (f"<|im_start|>user\n{row['input']}<|im_end|>\n<|im_start|>assistant\n"
                  f"{row['gen_prefix']}")
        assert tokenizer.count(prompt) == row["input_tokens"]
        assert 0.99 * (1024 - 32) <= row["input_tokens"] <= 1024 - 32


def test_prompt_layout_is_rulers(sized) -> None:
    """Instruction, the documents, the instruction again, the question; ``Answer:`` is the
    answer prefix, written by lm-eval after the question (or after the assistant header)."""
    row = sized["acadlm_qa_2"][0]
    assert row["gen_prefix"] == QA_ANSWER == "Answer:"
    instruction = QA_HEAD.split("\n\n")[0]
    prompt = plain_prompt(row)
    assert prompt.startswith(instruction + "\n\n") and prompt.count(instruction) == 2
    assert prompt.endswith(f"\n\n{instruction}\n\nQuestion: {row['question']} Answer:")
    first = documents_of(row)[0]
    assert QA_DOCUMENT.format(number=1, text=first) in prompt
    assert re.fullmatch(r"Place \d+-\d\n\S.*", first, flags=re.DOTALL)  # HotpotQA: title
    assert not documents_of(sized["acadlm_qa_1"][0])[0].startswith("Article")  # SQuAD: none


def test_a_file_too_small_for_the_length_is_refused(files: EvalFiles,
                                                   data: dict[str, Path]) -> None:
    """15 paragraphs cannot fill 4096 tokens: an error naming the length and what the file
    holds, never a shorter prompt."""
    metadata = files.metadata(squad_path=str(data["small"]), num_samples=2)
    tokenizer = load_length_tokenizer(metadata, task="t")
    with pytest.raises(ConfigError, match=r"`acadlm_qa_1: max_seq_lengths`: 4096: all 15 "
                                          r"distinct paragraphs of .*small\.jsonl "
                                          r"\(`squad_path`\) hold (\d+) tokens as a prompt") as err:
        squad_dataset(**metadata, max_seq_lengths=[1024, 4096])
    held = int(re.search(r"hold (\d+) tokens", str(err.value)).group(1))
    whole = sum(tokenizer.count(row["gold"][0]["text"]) for row in squad_rows(3, 5))
    assert whole < held < 0.99 * (4096 - 32)
    assert f"lengths up to {held + 32}" in str(err.value)
    [row, _] = squad_dataset(**metadata, max_seq_lengths=[1024])["test"].to_list()
    assert row["input_tokens"] >= 0.99 * row["budget_tokens"]


@pytest.mark.parametrize("task,key,dataset", [("acadlm_qa_1", "squad_path", "squad"),
                                              ("acadlm_qa_2", "hotpotqa_path", "hotpotqa")])
def test_without_a_file_the_task_names_the_key_and_the_convert_command(
        files: EvalFiles, tmp_path: Path, task: str, key: str, dataset: str) -> None:
    with pytest.raises(ConfigError, match=rf"`{task}: {key}`: no file given.*"
                                          rf"acadlm-eval-data convert {dataset} "):
        BUILDERS[task](**files.metadata(max_seq_lengths=[1024]))
    with pytest.raises(ConfigError, match=r"former merged task `acadlm_ruler_qa`"):
        BUILDERS[task](**files.metadata(max_seq_lengths=[1024], qa_path="old.jsonl"))
    with pytest.raises(ConfigError, match=rf"`{task}: {key}`: .*missing\.jsonl does not exist"
                                          rf".*acadlm-eval-data convert {dataset}"):
        BUILDERS[task](**files.metadata(max_seq_lengths=[1024],
                                        **{key: str(tmp_path / "missing.jsonl")}))


def test_more_samples_than_questions_is_refused(files: EvalFiles, data: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"`acadlm_qa_2: num_samples`: 30 questions asked "
                                          r"for, but .* holds 24"):
        build(files, data, "acadlm_qa_2", max_seq_lengths=[1024], num_samples=30)


def test_same_seed_same_prompts_other_seed_other_distractors(files: EvalFiles,
                                                             data: dict[str, Path]) -> None:
    def prompts(seed: int) -> list[str]:
        rows = build(files, data, "acadlm_qa_1", max_seq_lengths=[1024], num_samples=2,
                     seed=seed)
        return [row["input"] for row in rows]

    first = prompts(3)
    assert prompts(3) == first and all(a != b for a, b in zip(prompts(4), first))


def test_string_match_part_by_hand() -> None:
    """RULER's string_match_part: 100 when any reference occurs in the generation, ignoring
    case and surrounding whitespace; the score of a length is the mean over its questions."""
    doc = {"outputs": ["Denver Broncos", "Broncos"], "max_length": 1024}
    assert process_results_match_part(doc, [" The Denver Broncos won."]) == {"1024": 100.0}
    assert process_results_match_part(doc, ["broncos\n"]) == {"1024": 100.0}  # one is enough
    assert process_results_match_part(doc, ["Denver"]) == {"1024": 0.0}
    assert process_results_match_part(doc, ["The Carolina Panthers"]) == {"1024": 0.0}


class _FirstRightLM(OracleLM):
    """Answers the first question of each length right and every other one wrong."""

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return [f" {request.doc['outputs'][0]}." if request.doc["index"] == 0 else " Nobody."
                for request in requests]


@pytest.fixture(scope="module")
def runs(files: EvalFiles, data: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """lm-eval on the group ``acadlm_ruler_qa`` (both tasks) at 1K and 2K, two questions each,
    with a perfect, a constant, a half-right model and the perfect one opening its answers with
    a blank line."""
    from lm_eval import simple_evaluate

    manager = task_manager(qa_metadata(files, data, max_seq_lengths=LENGTHS, num_samples=2),
                           include_defaults=False)
    return {name: simple_evaluate(model=model, tasks=["acadlm_ruler_qa"], task_manager=manager,
                                  log_samples=True, verbosity="ERROR")
            for name, model in (("oracle", OracleLM()), ("constant", ConstantLM()),
                                ("half", _FirstRightLM()),
                                ("blank_line", BlankLineFirstOracleLM()))}


def _length_scores(results: dict[str, Any], task: str) -> dict[int, float]:
    return {int(key.split(",")[0]): value for key, value in results["results"][task].items()
            if re.fullmatch(r"\d+,none", key)}


@pytest.mark.parametrize("task", QA_TASKS)
def test_lm_eval_scores_oracle_100_constant_0_half_50(runs, task: str) -> None:
    assert _length_scores(runs["oracle"], task) == {1024: 100.0, 2048: 100.0}
    assert _length_scores(runs["constant"], task) == {1024: 0.0, 2048: 0.0}
    assert _length_scores(runs["half"], task) == {1024: 50.0, 2048: 50.0}
    config = runs["oracle"]["configs"][task]
    assert config["generation_kwargs"]["max_gen_toks"] == 32
    # RULER stops at no string (STOP_WORDS=""): an answer after a blank line still counts.
    assert config["generation_kwargs"]["until"] == []
    assert _length_scores(runs["blank_line"], task) == {1024: 100.0, 2048: 100.0}
    assert config["gen_prefix"] == "{{gen_prefix}}"
    for sample in runs["oracle"]["samples"][task]:
        assert sample["arguments"][0][0] == plain_prompt(sample["doc"])
        assert sample["arguments"][0][0].endswith("? Answer:")


def test_the_group_is_the_two_tasks_and_averages_them(runs) -> None:
    assert _length_scores(runs["half"], "acadlm_ruler_qa") == {1024: 50.0, 2048: 50.0}
    assert set(runs["half"]["samples"]) == set(QA_TASKS)


# --- From the published files, through acadlm-eval-data ------------------------------------------

def _squad_v2(rng: random.Random) -> dict[str, Any]:
    """SQuAD 2.0's layout: data[].paragraphs[].qas[], with one unanswerable question."""
    articles = []
    for a in range(5):
        paragraphs = []
        for p in range(4):
            context = f"{_paragraph(rng)} The ferryman was Orrin{a}x{p}."
            qas = [{"id": f"q{a}{p}", "question": f"Who was ferryman {a}.{p}?",
                    "is_impossible": False,
                    "answers": [{"text": f"Orrin{a}x{p}", "answer_start": 0}]}]
            if a == p == 0:
                qas.append({"id": "nope", "question": "Who was never there?",
                            "is_impossible": True, "answers": []})
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"River_{a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}


def _hotpot(rng: random.Random) -> list[dict[str, Any]]:
    """HotpotQA's layout: context as [title, [sentences]], supporting_facts as [title, i]."""
    items = []
    for q in range(12):
        context = [[f"Hill {q}-{k}", [_paragraph(rng, 20), f" Marker {k} stands here."]]
                   for k in range(6)]
        context[2][1].append(f" It was raised by Tamsin{q}.")
        items.append({"_id": f"id{q}", "question": f"Who raised the marker of hill {q}?",
                      "answer": f"Tamsin{q}", "type": "bridge", "level": "hard",
                      "supporting_facts": [[f"Hill {q}-2", 2], [f"Hill {q}-4", 0]],
                      "context": context})
    return items


def test_files_converted_by_acadlm_eval_data_feed_both_tasks(files: EvalFiles,
                                                             tmp_path: Path) -> None:
    from acadlm_plugins.evaluation.converters.catalog import convert_file

    rng = random.Random(5)
    squad = tmp_path / "dev-v2.0.json"
    squad.write_text(json.dumps(_squad_v2(rng)))
    hotpot = tmp_path / "hotpot_dev_distractor_v1.json"
    hotpot.write_text(json.dumps(_hotpot(rng)))
    squad_out = convert_file("squad", squad, tmp_path / "squad.jsonl").output
    hotpot_out = convert_file("hotpotqa", hotpot, tmp_path / "hotpot.jsonl").output
    metadata = files.metadata(squad_path=str(squad_out), hotpotqa_path=str(hotpot_out),
                              max_seq_lengths=[1024], num_samples=2)
    tokenizer: LengthTokenizer = load_length_tokenizer(metadata, task="t")
    first, second = squad_dataset(**metadata)["test"].to_list()
    assert first["outputs"] == ["Orrin0x0"] and second["outputs"] == ["Orrin0x1"]
    assert "Who was never there?" not in (first["question"], second["question"])
    for row in (first, second):
        kinds = row["document_kinds"]
        assert kinds.count("gold") == 1 and kinds.count("own") == 3  # its article's others
        assert not any(text.startswith("River") for text in documents_of(row))
        assert 0.99 * row["budget_tokens"] <= tokenizer.count(plain_prompt(row))
    for row in hotpotqa_dataset(**metadata)["test"].to_list():
        texts, kinds = documents_of(row), row["document_kinds"]
        gold = [text for text, kind in zip(texts, kinds) if kind == "gold"]
        assert sorted(text.split("\n")[0] for text in gold) == [
            f"Hill {row['index']}-2", f"Hill {row['index']}-4"]
        assert kinds.count("own") == 4 and row["outputs"] == [f"Tamsin{row['index']}"]
