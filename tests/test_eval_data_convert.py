"""``acadlm-eval-data``: every dataset from a tiny file in its published format, converted and
read back through the loader of the task that consumes it; bad rows reported as ``file:line``
(or the item of a JSON file) with the field and the fix; atomic, deterministic output.

The fixtures copy the field names and nesting of the real files (HELMET's data/kilt and
data/msmarco rows, SQuAD 2.0, HotpotQA, TREC's .label files, BANKING77's CSV, CLINC150's
data_oos_plus.json, NLU's annotated CSV, the Hugging Face rows of NarrativeQA and Multi-LexSum,
InfiniteBench's jsonl, ALCE's JSON lists); their contents are made up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from acadlm_plugins.evaluation.converters import DATASETS, Options, convert_file
from acadlm_plugins.evaluation.converters.cli import main
from acadlm_plugins.evaluation.local_data import (
    load_choice,
    load_icl,
    load_longqa,
    load_qa,
    load_rerank,
    load_summ,
)

# ------------------------------------------------------------------------------------ helpers


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def converted(capsys: pytest.CaptureFixture[str], dataset: str, source: Path, out: Path,
              *extra: Any) -> str:
    """Convert through the CLI, expecting success; returns what it printed."""
    code, stdout, stderr = run_cli(capsys, "convert", dataset, source, "-o", out, *extra)
    assert code == 0, stderr
    assert out.is_file()
    return stdout


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def failure(capsys: pytest.CaptureFixture[str], dataset: str, source: Path, out: Path,
            *extra: Any) -> str:
    """Convert through the CLI, expecting the error exit; returns the message."""
    code, _, stderr = run_cli(capsys, "convert", dataset, source, "-o", out, *extra)
    assert code == 2
    assert "Traceback" not in stderr
    assert stderr.startswith("acadlm-eval-data: error: ")
    return stderr


# ------------------------------------------------------------------------ KILT (HELMET's RAG)


def _retrieved(n: int, topic: str) -> list[dict[str, Any]]:
    """Retrieved passages as in HELMET's ctxs: id, title, text, score, has_answer."""
    return [{"id": f"{topic}{i}", "title": f"{topic.title()} {i}",
             "text": f"Passage {i} about {topic} that does not hold the answer.",
             "score": f"{80 - i}.5", "has_answer": False} for i in range(n)]


def helmet_kilt_rows(depths: tuple[float, ...], *, gold_count: int = 1,
                     with_depth: bool = True) -> list[dict[str, Any]]:
    """Two questions, each repeated once per depth with its gold passage(s) inserted into the
    retrieved ``ctxs`` at that depth, like data/kilt/*-multikilt_1000_k*_dep*.jsonl. A further
    positive passage that HELMET does not insert is listed in ``positive_ctxs`` too."""
    questions = [("who wrote the novel moby dick", ["Herman Melville"], "whales"),
                 ("when did the first moon landing happen", ["1969", "July 20, 1969"], "moon")]
    rows = []
    for question, answers, topic in questions:
        positives = [{"title": f"Gold {topic} {g}", "text": f"The answer is {answers[0]} ({g}).",
                      "score": 1000, "title_score": 1, "passage_id": f"{topic}-gold{g}"}
                     for g in range(gold_count)]
        spare = {"title": f"Spare {topic}", "text": f"Also: {answers[0]}.", "score": 900,
                 "title_score": 0, "passage_id": f"{topic}-spare"}
        negatives = [{"title": f"Hard {topic}", "text": f"A hard negative about {topic}.",
                      "score": 9, "title_score": 0, "passage_id": f"{topic}-hard"}]
        for depth in depths:
            ctxs = _retrieved(5, topic)
            at = round(depth * len(ctxs))
            gold_copies = [{"id": p["passage_id"], "title": p["title"], "text": p["text"],
                            "score": "99.0", "has_answer": True} for p in positives]
            row = {"question": question, "answers": answers,
                   "ctxs": ctxs[:at] + gold_copies + ctxs[at:],
                   "positive_ctxs": positives + [spare], "hard_negative_ctxs": negatives}
            if with_depth:
                row["depth"] = depth
            rows.append(row)
    return rows


@pytest.mark.parametrize("dataset,gold_count,with_depth", [
    ("kilt_nq", 1, True), ("kilt_triviaqa", 1, True), ("kilt_hotpotqa", 2, False)])
def test_kilt_rows_become_one_qa_row_per_question(tmp_path, capsys, dataset, gold_count,
                                                  with_depth):
    depths = (0.0, 0.5, 1.0)
    source = write_jsonl(tmp_path / "dev-multikilt_1000_k5_dep3.jsonl",
                         helmet_kilt_rows(depths, gold_count=gold_count, with_depth=with_depth))
    out = tmp_path / "rag.jsonl"
    printed = converted(capsys, dataset, source, out)
    assert f"{dataset}: read 6 rows, wrote 2, skipped 4" in printed
    assert '"rag_path"' in printed and "acadlm_rag" in printed
    records = load_qa(out, task="acadlm_rag", key="rag_path")
    assert [r.question for r in records] == ["who wrote the novel moby dick",
                                             "when did the first moon landing happen"]
    assert records[1].answers == ("1969", "July 20, 1969")
    assert len(records[0].gold) == gold_count
    assert records[0].gold[0].text == "The answer is Herman Melville (0)."
    assert records[0].gold[0].title == "Gold whales 0"
    # the retrieved passages, in retrieval order, without the gold copies
    assert [p.title for p in records[0].distractors] == [f"Whales {i}" for i in range(5)]


def test_kilt_popqa_keeps_the_long_tail_like_helmet(tmp_path, capsys):
    rows = helmet_kilt_rows((0.0,))
    rows[0].update(s_pop=512, subj_id=1, prop_id=22, obj_id=3)
    rows[1].update(s_pop=4096, subj_id=2, prop_id=22, obj_id=4)
    source = write_jsonl(tmp_path / "popqa_test_1000_k5_dep6.jsonl", rows)
    printed = converted(capsys, "kilt_popqa", source, tmp_path / "popqa.jsonl")
    assert "skipped 1: popular entity (s_pop >= 10^3" in printed
    assert len(load_qa(tmp_path / "popqa.jsonl", task="acadlm_rag", key="rag_path")) == 1
    converted(capsys, "kilt_popqa", source, tmp_path / "all.jsonl", "--popularity-below", "inf")
    assert len(read_rows(tmp_path / "all.jsonl")) == 2


@pytest.mark.parametrize(("value", "problem"), [("nan", "nan is not a number"),
                                              ("-inf", "-inf would keep no row")])
def test_kilt_popqa_refuses_a_popularity_bound_that_is_no_bound(tmp_path, capsys, value,
                                                                  problem):
    """NaN compared false with every s_pop, so every row was kept, silently, as with `inf`;
    -inf was taken as "keep all" too. Both are refused; `inf` stays "keep all" (documented)."""
    rows = helmet_kilt_rows((0.0,))
    rows[0].update(s_pop=512)
    rows[1].update(s_pop=999999)
    source = write_jsonl(tmp_path / "popqa.jsonl", rows)
    stderr = failure(capsys, "kilt_popqa", source, tmp_path / "out.jsonl",
                     f"--popularity-below={value}")
    assert f"--popularity-below {problem}" in stderr and "or inf to keep every row" in stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_kilt_popqa_popularity_bound_beyond_a_float_keeps_all(tmp_path, capsys):
    """10 ** 400.0 overflows a float: the bound is then above every s_pop, not a traceback."""
    rows = helmet_kilt_rows((0.0,))
    rows[0].update(s_pop=512)
    rows[1].update(s_pop=999999)
    source = write_jsonl(tmp_path / "popqa.jsonl", rows)
    converted(capsys, "kilt_popqa", source, tmp_path / "all.jsonl", "--popularity-below", 400)
    assert len(read_rows(tmp_path / "all.jsonl")) == 2


def test_dpr_multikilt_json_list_uses_hard_negatives(tmp_path, capsys):
    rows = [{"question": q, "answers": [a], "negative_ctxs": [],
             "positive_ctxs": [{"title": "Gold", "text": f"{a} is the answer.", "score": 1,
                                "title_score": 1, "passage_id": "1"}],
             "hard_negative_ctxs": [{"title": "Near", "text": f"Near miss {i}.", "score": 0,
                                     "title_score": 0, "passage_id": str(10 + i)}
                                    for i in range(3)]}
            for q, a in (("capital of france", "Paris"), ("largest planet", "Jupiter"))]
    source = write_json(tmp_path / "nq-dev-multikilt.json", rows)
    out = tmp_path / "nq.jsonl"
    converted(capsys, "kilt_nq", source, out, "--max-passages", 2)
    records = load_qa(out, task="acadlm_rag", key="rag_path")
    assert [len(r.distractors) for r in records] == [2, 2]
    assert records[0].distractors[0].text == "Near miss 0."


# ------------------------------------------------------------------------- RULER qa_1, qa_2


def squad_v2() -> dict[str, Any]:
    """SQuAD 2.0's layout: data[].paragraphs[].qas[] with is_impossible."""
    return {"version": "v2.0", "data": [{
        "title": "Normans",
        "paragraphs": [
            {"context": "The Normans were the people who gave their name to Normandy.",
             "qas": [
                 {"question": "In what country is Normandy located?", "id": "56ddde6b9a695914",
                  "answers": [{"text": "France", "answer_start": 159},
                              {"text": "France", "answer_start": 159}],
                  "is_impossible": False},
                 {"plausible_answers": [{"text": "Rollo", "answer_start": 308}],
                  "question": "Who did King Charles III swear fealty to?",
                  "id": "5ad39d53604f3c001a3fe8d3", "answers": [], "is_impossible": True}]},
            {"context": "Rollo agreed to swear fealty to King Charles III of West Francia.",
             "qas": [
                 {"question": "Who swore fealty to Charles III?", "id": "56dddf4066d3e219",
                  "answers": [{"text": "Rollo", "answer_start": 0}], "is_impossible": False}]},
        ]}]}


def test_squad_v2_answerable_questions_for_ruler_qa(tmp_path, capsys):
    source = write_json(tmp_path / "dev-v2.0.json", squad_v2())
    out = tmp_path / "squad.jsonl"
    printed = converted(capsys, "squad", source, out)
    assert "read 3 rows, wrote 2, skipped 1" in printed
    assert "unanswerable (SQuAD 2.0 is_impossible" in printed
    records = load_qa(out, task="acadlm_qa_1", key="squad_path")
    assert [r.id for r in records] == ["56ddde6b9a695914", "56dddf4066d3e219"]
    assert records[0].answers == ("France",)
    assert records[0].gold[0].text.startswith("The Normans were")
    assert records[0].gold[0].title == "Normans"
    assert [p.text for p in records[0].distractors] == [
        "Rollo agreed to swear fealty to King Charles III of West Francia."]


def hotpot_items() -> list[dict[str, Any]]:
    """hotpot_dev_distractor_v1.json: _id, answer, question, supporting_facts, context."""
    return [{"_id": "5a8b57f25542995d1e6f1371", "answer": "yes",
             "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
             "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
             "context": [["Ed Wood (film)", ["Ed Wood is a 1994 film.", " It stars Depp."]],
                         ["Scott Derrickson", ["Scott Derrickson is an American director."]],
                         ["Ed Wood", ["Edward Davis Wood Jr. was an American filmmaker."]]],
             "type": "comparison", "level": "hard"},
            {"_id": "5a8c7595554299585d9e36b6", "answer": "Chief of Protocol",
             "question": "What government position was held by the woman who portrayed "
                         "Corliss Archer?",
             "supporting_facts": [["Shirley Temple", 0]],
             "context": [["Kiss and Tell", ["Kiss and Tell is a 1945 comedy film."]],
                         ["Shirley Temple", ["Shirley Temple served as Chief of Protocol."]]],
             "type": "bridge", "level": "hard"}]


def test_hotpotqa_json_for_ruler_qa(tmp_path, capsys):
    source = write_json(tmp_path / "hotpot_dev_distractor_v1.json", hotpot_items())
    out = tmp_path / "hotpot.jsonl"
    converted(capsys, "hotpotqa", source, out)
    records = load_qa(out, task="acadlm_qa_2", key="hotpotqa_path")
    assert [p.title for p in records[0].gold] == ["Scott Derrickson", "Ed Wood"]
    assert [p.text for p in records[0].distractors] == ["Ed Wood is a 1994 film. It stars Depp."]
    assert records[1].answers == ("Chief of Protocol",)


def test_hotpotqa_hugging_face_rows_read_the_same(tmp_path, capsys):
    rows = []
    for item in hotpot_items():
        rows.append({"id": item["_id"], "question": item["question"], "answer": item["answer"],
                     "type": item["type"], "level": item["level"],
                     "supporting_facts": {"title": [t for t, _ in item["supporting_facts"]],
                                          "sent_id": [s for _, s in item["supporting_facts"]]},
                     "context": {"title": [t for t, _ in item["context"]],
                                 "sentences": [s for _, s in item["context"]]}})
    official, hf = tmp_path / "official.jsonl", tmp_path / "hf.jsonl"
    converted(capsys, "hotpotqa", write_json(tmp_path / "hotpot.json", hotpot_items()), official)
    converted(capsys, "hotpotqa", write_jsonl(tmp_path / "validation.json", rows), hf)
    assert read_rows(official) == read_rows(hf)


# ------------------------------------------------------------------------------- MS MARCO


def test_msmarco_helmet_rows(tmp_path, capsys):
    def query(qid: str, text: str, labels: list[int]) -> dict[str, Any]:
        return {"qid": qid, "query": text,
                "ctxs": [{"id": f"{qid}{i}", "text": f"Passage {i} for {text}.", "label": label}
                         for i, label in enumerate(labels)]}
    rows = [query("1037798", "who is robert gray", [3, 0, 1]),
            query("1037798", "who is robert gray", [3, 0, 1]),  # the next depth
            query("104861", "cost of interior concrete flooring", [0, 0]),
            query("1063750", "why did the us volunterilay enter ww1", [0, 2, 0, 1])]
    source = write_jsonl(tmp_path / "test_reranking_data_k3_dep3.jsonl", rows)
    out = tmp_path / "rerank.jsonl"
    printed = converted(capsys, "msmarco", source, out, "--max-passages", 3)
    assert "skipped 1: repeated query" in printed
    assert "skipped 1: query with no passage of relevance > 0" in printed
    records = load_rerank(out, task="acadlm_rerank", key="rerank_path")
    assert [r.id for r in records] == ["1037798", "1063750"]
    assert [p.relevance for p in records[1].passages] == [0.0, 2.0, 0.0]


def test_msmarco_trec_run_with_qrels(tmp_path, capsys):
    run_lines = ["19335\t1017759\tanthropological definition of environment\tDefinition one.",
                 "19335\t1082489\tanthropological definition of environment\tUnjudged text.",
                 "19335\t1091692\tanthropological definition of environment\tDefinition two.",
                 "47923\t1000065\taxon terminal definition\tNo judgments for this query."]
    source = tmp_path / "msmarco-passagetest2019-top1000.tsv"
    source.write_text("\n".join(run_lines) + "\n", encoding="utf-8")
    qrels = tmp_path / "2019qrels-pass.txt"
    qrels.write_text("19335 0 1017759 0\n19335 0 1091692 3\n19335 0 1720389 1\n",
                     encoding="utf-8")
    out = tmp_path / "dl19.jsonl"
    printed = converted(capsys, "msmarco", source, out, "--qrels", qrels)
    assert "read 4 rows, wrote 1" in printed
    (record,) = load_rerank(out, task="acadlm_rerank", key="rerank_path")
    assert record.query == "anthropological definition of environment"
    assert [(p.text, p.relevance) for p in record.passages] == [
        ("Definition one.", 0.0), ("Definition two.", 3.0)]
    stderr = failure(capsys, "msmarco", source, tmp_path / "x.jsonl")
    assert "--qrels" in stderr


# ------------------------------------------------------------------------------------- ICL


def test_trec_label_files_with_test_split(tmp_path, capsys):
    train = tmp_path / "train_5500.label"
    train.write_bytes(b"DESC:manner How did serfdom develop in and then leave Russia ?\n"
                      b"ENTY:cremat What films featured the character Popeye Doyle ?\n"
                      b"HUM:ind Who was the sister\xf0city founder ?\n"
                      b"NUM:date When was Ozzy Osbourne born ?\n")
    test = tmp_path / "TREC_10.label"
    test.write_text("NUM:dist How far is it from Denver to Aspen ?\n"
                    "LOC:city What county is Modesto , California in ?\n", encoding="utf-8")
    stderr = failure(capsys, "trec_coarse", train, tmp_path / "x.jsonl", "--test", test)
    assert f"{train}:3: is not utf-8 text (byte 0xf0 at column 27)." in stderr
    assert "--encoding latin-1" in stderr
    coarse, fine = tmp_path / "coarse.jsonl", tmp_path / "fine.jsonl"
    converted(capsys, "trec_coarse", train, coarse, "--test", test, "--encoding", "latin-1")
    converted(capsys, "trec_fine", train, fine, "--test", test, "--encoding", "latin-1")
    rows = load_icl(coarse, task="acadlm_icl", key="icl_path")
    assert [(r.label, r.split) for r in rows] == [
        ("DESC", "demo"), ("ENTY", "demo"), ("HUM", "demo"), ("NUM", "demo"),
        ("NUM", "test"), ("LOC", "test")]
    assert rows[0].text == "How did serfdom develop in and then leave Russia ?"
    assert [r.label for r in load_icl(fine, task="acadlm_icl", key="icl_path")][:2] == [
        "DESC:manner", "ENTY:cremat"]


def test_banking77_csv_with_test_split(tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text('text,category\n"I am still waiting on my card?",card_arrival\n'
                     '"My card was declined, why?",declined_card_payment\n', encoding="utf-8")
    test = tmp_path / "test.csv"
    test.write_text('text,category\nHow do I locate my card?,card_arrival\n', encoding="utf-8")
    out = tmp_path / "banking77.jsonl"
    converted(capsys, "banking77", train, out, "--test", test)
    rows = load_icl(out, task="acadlm_icl", key="icl_path")
    assert [(r.text, r.label, r.split) for r in rows] == [
        ("I am still waiting on my card?", "card_arrival", "demo"),
        ("My card was declined, why?", "declined_card_payment", "demo"),
        ("How do I locate my card?", "card_arrival", "test")]


def test_banking77_hugging_face_rows(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "card not here yet", "label": 11},
                                                   {"text": "top up failed", "label": 59}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "where is my card", "label": 11}])
    out = tmp_path / "b.jsonl"
    converted(capsys, "banking77", train, out, "--test", test)
    assert [r.label for r in load_icl(out, task="acadlm_icl", key="icl_path")] == ["11", "59",
                                                                                   "11"]


def test_clinc150_own_json_splits_as_helmet(tmp_path, capsys):
    document = {"train": [["what's the weather like", "weather"], ["set a timer", "timer"]],
                "oos_train": [["how old is the moon", "oos"]],
                "val": [["is it going to rain", "weather"]], "oos_val": [["sing to me", "oos"]],
                "test": [["timer for ten minutes", "timer"]], "oos_test": [["what is love", "oos"]]}
    source = write_json(tmp_path / "data_oos_plus.json", document)
    out = tmp_path / "clinc.jsonl"
    printed = converted(capsys, "clinc150", source, out)
    assert "skipped 2: CLINC150 test split (HELMET asks about val)" in printed
    rows = load_icl(out, task="acadlm_icl", key="icl_path")
    assert [(r.label, r.split) for r in rows] == [
        ("weather", "demo"), ("timer", "demo"), ("oos", "demo"), ("weather", "test"),
        ("oos", "test")]


def test_nlu_annotated_csv(tmp_path, capsys):
    header = ("userid;answerid;scenario;intent;status;answer_annotation;notes;"
              "suggested_entities;answer_normalised;answer;question")
    lines = [header,
             ('1;1;"alarm";"set";"";"wake me up at [time : five am] this week";"";"";'
              '"wake me up at five am this week";"wake me up at 5am this week";"q"'),
             '1;2;"alarm";"set";"";"null";"";"";"";"";"q"',
             ('2;3;"weather";"query";"";"will it rain [date : tomorrow]";"";"";'
              '"will it rain tomorrow";"will it rain tomorrow";"q"')]
    source = tmp_path / "NLU-Data-Home-Domain-Annotated-All.csv"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "nlu.jsonl"
    printed = converted(capsys, "nlu", source, out)
    assert "read 3 rows, wrote 2, skipped 1" in printed
    rows = load_icl(out, task="acadlm_icl", key="icl_path")
    assert [(r.text, r.label, r.split) for r in rows] == [
        ("wake me up at five am this week", "alarm_set", None),
        ("will it rain tomorrow", "weather_query", None)]


# ------------------------------------------------------------------ long documents, summaries


def test_narrativeqa_hugging_face_rows(tmp_path, capsys):
    def row(doc_id: str, story: str, question: str, answers: list[str]) -> dict[str, Any]:
        return {"document": {"id": doc_id, "kind": "gutenberg", "url": "http://x",
                             "file_size": 1, "word_count": 3, "start": "S", "end": "E",
                             "summary": {"text": "s", "tokens": ["s"], "url": "u", "title": "t"},
                             "text": story},
                "question": {"text": question, "tokens": question.split()},
                "answers": [{"text": a, "tokens": a.split()} for a in answers]}
    source = write_jsonl(tmp_path / "test.jsonl", [
        row("00936497", "A long story about Mark.", "Who is the hero?", ["Mark", "Mark Hunter"]),
        row("00936497", "A long story about Mark.", "Where is it set?", ["A town"]),
        row("01ab", "Another story.", "What happens?", ["Nothing"])])
    out = tmp_path / "narrativeqa.jsonl"
    converted(capsys, "narrativeqa", source, out)
    records = load_longqa(out, task="acadlm_narrativeqa", key="narrativeqa_path")
    assert [r.id for r in records] == ["00936497:0", "00936497:1", "01ab:0"]
    assert records[0].answers == ("Mark", "Mark Hunter")
    assert records[0].document == "A long story about Mark."


def infbench_rows(kind: str) -> list[dict[str, Any]]:
    options = {"choice": ["Walking Georgie", "Riding Georgie", "Shopping", "Sleeping"]}
    answers = {"qa": ["Walking Georgie"], "choice": ["Riding Georgie"],
               "sum": ["The book follows Mrs. Bloomsbury through one long day."]}
    return [{"id": i, "context": f"Chapter one. A long novel {i}.",
             "input": "" if kind == "sum" else "What did she do after lunch?",
             "answer": answers[kind], "options": options.get(kind, [])} for i in range(2)]


def test_infbench_qa_choice_and_sum(tmp_path, capsys):
    qa = write_jsonl(tmp_path / "longbook_qa_eng.jsonl", infbench_rows("qa"))
    choice = write_jsonl(tmp_path / "longbook_choice_eng.jsonl", infbench_rows("choice"))
    summ = write_jsonl(tmp_path / "longbook_sum_eng.jsonl", infbench_rows("sum"))
    printed = converted(capsys, "infbench_qa", qa, tmp_path / "qa.jsonl")
    assert "--tasks acadlm_infbench_qa" in printed and "infbench_qa_path" in printed
    converted(capsys, "infbench_choice", choice, tmp_path / "choice.jsonl")
    converted(capsys, "infbench_sum", summ, tmp_path / "summ.jsonl")
    first = load_longqa(tmp_path / "qa.jsonl", task="acadlm_infbench_qa",
                        key="infbench_qa_path")[0]
    assert (first.id, first.answers) == ("0", ("Walking Georgie",))
    # The options stay apart, in order, and the answer names the correct one: the task letters
    # them A-D and scores the letter (B) as HELMET does.
    picked = load_choice(tmp_path / "choice.jsonl", task="acadlm_infbench_choice",
                         key="infbench_choice_path")[0]
    assert picked.question == "What did she do after lunch?"
    assert picked.options == ("Walking Georgie", "Riding Georgie", "Shopping", "Sleeping")
    assert (picked.answer, picked.letter) == (1, "B")
    summary = load_summ(tmp_path / "summ.jsonl", task="acadlm_infbench_sum",
                        key="infbench_sum_path")[0]
    assert summary.summaries == ("The book follows Mrs. Bloomsbury through one long day.",)


def test_infbench_choice_answer_must_be_an_option(tmp_path, capsys):
    rows = infbench_rows("choice")
    rows[1]["answer"] = ["Swimming"]
    stderr = failure(capsys, "infbench_choice", write_jsonl(tmp_path / "c.jsonl", rows),
                     tmp_path / "out.jsonl")
    assert "c.jsonl:2" in stderr and "`answer`" in stderr and "'Swimming'" in stderr


def test_multi_lexsum_hugging_face_rows(tmp_path, capsys):
    def case(case_id: str, short: str | None) -> dict[str, Any]:
        return {"id": case_id, "sources": ["Complaint text.", "Order text."],
                "sources_metadata": {"doc_id": ["a", "b"], "doc_type": ["Complaint", "Order"],
                                     "doc_title": ["C", "O"], "parser": ["x", "x"],
                                     "is_ocr": [False, False], "url": ["u", "u"]},
                "summary/long": "A long summary.", "summary/short": short,
                "summary/tiny": None, "case_metadata": {"case_name": case_id}}
    source = write_jsonl(tmp_path / "validation.jsonl", [
        case("CR-AL-0001", "The plaintiffs sued the county."), case("CR-AL-0002", None)])
    out = tmp_path / "lexsum.jsonl"
    printed = converted(capsys, "multi_lexsum", source, out)
    assert "skipped 1: case without a short summary" in printed
    (record,) = load_summ(out, task="acadlm_multi_lexsum", key="multi_lexsum_path")
    assert record.document == "Complaint text.\n\nOrder text."
    assert record.summaries == ("The plaintiffs sued the county.",)


# -------------------------------------------------------------------------------- ALCE cite


def alce_docs(n: int) -> list[dict[str, Any]]:
    return [{"id": str(9000 + i), "title": f"Page {i}", "text": f"Retrieved text {i}.",
             "score": 1.5 - i / 10} for i in range(n)]


def test_alce_asqa_and_qampari_read_by_the_cite_tasks(tmp_path, capsys):
    from acadlm_plugins.evaluation import helmet

    asqa = [{"qa_pairs": [{"context": "No context available.", "question": "Who sang x in 1990?",
                           "short_answers": ["Ann Smith"], "wikipage": None},
                          {"context": "No context available.", "question": "Who sang x in 2000?",
                           "short_answers": ["Bo", "Bo Lee"], "wikipage": "X"}],
             "wikipages": [{"title": "X", "url": "https://en.wikipedia.org/wiki/X"}],
             "annotations": [{"knowledge": [], "long_answer": "Ann Smith in 1990; Bo in 2000."}],
             "sample_id": "-8354367633862148479", "question": "Who sang x?",
             "docs": alce_docs(4), "answer": "Ann Smith sang it in 1990 [1]."}]
    qampari = [{"id": "797__wikidata_comp__dev", "question": "Which films did Z direct?",
                "answers": [["Film A"], ["Film B", "B (film)"]], "answer": "Film A, Film B.",
                "docs": alce_docs(3)}]
    asqa_out, qampari_out = tmp_path / "asqa.jsonl", tmp_path / "qampari.jsonl"
    converted(capsys, "alce_asqa", write_json(tmp_path / "asqa_eval_gtr_top100.json", asqa),
              asqa_out, "--max-passages", 2)
    converted(capsys, "alce_qampari",
              write_json(tmp_path / "qampari_eval_gtr_top100.json", qampari), qampari_out)
    (item,) = helmet.load_alce(asqa_out, helmet.ASQA, task="acadlm_cite_asqa", key="asqa_path")
    assert item.answer_sets == (("Ann Smith",), ("Bo", "Bo Lee"))
    assert [d.title for d in item.docs] == ["Page 0", "Page 1"]
    assert item.answer == "Ann Smith sang it in 1990 [1]."
    (item,) = helmet.load_alce(qampari_out, helmet.QAMPARI, task="acadlm_cite_qampari",
                               key="qampari_path")
    assert item.answer_sets == (("Film A",), ("Film B", "B (film)"))
    assert len(item.docs) == 3


# ------------------------------------------------------------------------------ bad inputs


def test_corrupt_json_line_names_file_line_and_fix(tmp_path, capsys):
    source = tmp_path / "nq.jsonl"
    good = json.dumps(helmet_kilt_rows((0.0,))[0])
    source.write_text(good + "\n" + '{"question": "cut short", "answers": [\n', encoding="utf-8")
    stderr = failure(capsys, "kilt_nq", source, tmp_path / "out.jsonl")
    assert f"{source}:2: is not valid JSON (Expecting value at column 39)." in stderr
    assert "Fix: line 2 must be an object like" in stderr and "--skip-invalid" in stderr


def test_an_unterminated_string_reads_without_a_doubled_at(tmp_path, capsys):
    """json's message ends in "starting at": it was printed "starting at at column"."""
    source = tmp_path / "nq.jsonl"
    source.write_text('{"question": "cut short\n', encoding="utf-8")
    stderr = failure(capsys, "kilt_nq", source, tmp_path / "out.jsonl")
    assert f"{source}:1: is not valid JSON (Unterminated string starting at column 14)." in stderr
    assert "at at" not in stderr


def test_missing_field_names_the_field(tmp_path, capsys):
    row = helmet_kilt_rows((0.0,))[0]
    del row["answers"]
    source = write_jsonl(tmp_path / "nq.jsonl", [row])
    stderr = failure(capsys, "kilt_nq", source, tmp_path / "out.jsonl")
    assert f"{source}:1: field `answers` is missing." in stderr


def test_nested_field_of_a_json_document_names_the_item(tmp_path, capsys):
    document = squad_v2()
    del document["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["text"]
    source = write_json(tmp_path / "dev-v2.0.json", document)
    stderr = failure(capsys, "squad", source, tmp_path / "out.jsonl")
    assert (f"{source} at data[0].paragraphs[1].qas[0]: field `answers[0].text` is missing."
            in stderr)
    assert "Fix: data[0].paragraphs[1].qas[0] must be an object like" in stderr


def test_non_utf8_bytes_in_jsonl_and_json_documents(tmp_path, capsys):
    lines = [json.dumps(row).encode() for row in helmet_kilt_rows((0.0,))]
    source = tmp_path / "nq.jsonl"
    source.write_bytes(lines[0] + b"\n" + lines[1].replace(b"moon", b"m\xffon", 1) + b"\n")
    stderr = failure(capsys, "kilt_nq", source, tmp_path / "out.jsonl")
    column = lines[1].index(b"moon") + 2
    assert f"{source}:2: is not utf-8 text (byte 0xff at column {column})." in stderr
    assert "--encoding" in stderr
    document = tmp_path / "dev-v2.0.json"
    document.write_bytes(json.dumps(squad_v2(), indent=1).replace("Rollo", "R\xf6llo").encode(
        "latin-1"))
    stderr = failure(capsys, "squad", document, tmp_path / "out.jsonl")
    text = json.dumps(squad_v2(), indent=1)
    line = text[:text.index("Rollo")].count("\n") + 1
    assert f"{document}:{line}: is not utf-8 text (byte 0xf6 at column" in stderr


def test_broken_json_document_names_the_line(tmp_path, capsys):
    source = tmp_path / "hotpot_dev_distractor_v1.json"
    source.write_text(json.dumps(hotpot_items(), indent=1)[:-40], encoding="utf-8")
    stderr = failure(capsys, "hotpotqa", source, tmp_path / "out.jsonl")
    assert f"{source}:" in stderr and "is not valid JSON" in stderr


def test_bad_csv_record_and_bad_label_line(tmp_path, capsys):
    source = tmp_path / "train.csv"
    source.write_text("text,category\nfine,card_arrival\nno category here\n", encoding="utf-8")
    stderr = failure(capsys, "banking77", source, tmp_path / "out.jsonl")
    assert f"{source}:3: has 1 fields where the header has 2" in stderr
    header = tmp_path / "header.csv"
    header.write_text("sentence,intent\nhi,greet\n", encoding="utf-8")
    assert "lacks the column(s) text, category" in failure(capsys, "banking77", header,
                                                           tmp_path / "out.jsonl")
    label = tmp_path / "TREC_10.label"
    label.write_text("NUM:dist How far ?\nhow far is it\n", encoding="utf-8")
    stderr = failure(capsys, "trec_coarse", label, tmp_path / "out.jsonl")
    assert f"{label}:2: does not read `COARSE:fine question`" in stderr


def test_skip_invalid_keeps_good_rows_and_lists_bad_ones(tmp_path, capsys):
    rows = helmet_kilt_rows((0.0,))
    source = tmp_path / "nq.jsonl"
    source.write_bytes(json.dumps(rows[0]).encode() + b"\n{not json}\n\xff\xfe\n"
                       + json.dumps({"question": "no answers"}).encode() + b"\n"
                       + json.dumps(rows[1]).encode() + b"\n")
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = run_cli(capsys, "convert", "kilt_nq", source, "-o", out,
                                   "--skip-invalid")
    assert code == 0
    assert "read 5 rows, wrote 2, skipped 3" in stdout
    assert f"skipped: {source}:2: is not valid JSON" in stderr
    assert f"skipped: {source}:3: is not utf-8 text" in stderr
    assert f"skipped: {source}:4: field `answers` is missing." in stderr
    assert len(load_qa(out, task="acadlm_rag", key="rag_path")) == 2


def test_failed_conversion_leaves_the_old_output_and_no_temporary_file(tmp_path, capsys):
    out = tmp_path / "out" / "nq.jsonl"
    out.parent.mkdir()
    out.write_text("previous\n", encoding="utf-8")
    rows = helmet_kilt_rows((0.0,))
    rows[1]["answers"] = []
    source = write_jsonl(tmp_path / "nq.jsonl", rows)
    stderr = failure(capsys, "kilt_nq", source, out)
    assert f"{source}:2: field `answers` must be a non-empty list" in stderr
    assert out.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["nq.jsonl"]


def test_nothing_to_write_is_an_error(tmp_path, capsys):
    document = squad_v2()
    for paragraph in document["data"][0]["paragraphs"]:
        for qa in paragraph["qas"]:
            qa["is_impossible"] = True
    source = write_json(tmp_path / "dev-v2.0.json", document)
    out = tmp_path / "out.jsonl"
    stderr = failure(capsys, "squad", source, out)
    assert "no row to write" in stderr and "3 unanswerable" in stderr
    assert not out.exists()


# ------------------------------------------------------------------------- the command line


def test_output_is_deterministic_and_defaults_next_to_the_source(tmp_path, capsys):
    source = write_jsonl(tmp_path / "nq-dev.jsonl", helmet_kilt_rows((0.0, 1.0)))
    converted(capsys, "kilt_nq", source, tmp_path / "a.jsonl")
    converted(capsys, "kilt_nq", source, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert run_cli(capsys, "convert", "kilt_nq", source)[0] == 0
    assert (tmp_path / "nq-dev.kilt_nq.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_sample_keeps_a_seeded_subset_in_source_order(tmp_path, capsys):
    rows = [{"text": f"utterance {i}", "label": i % 3} for i in range(30)]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    picks = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        printed = converted(capsys, "banking77", source, out, "--sample", 5, "--seed", 7)
        assert "skipped 25: not drawn by --sample 5" in printed
        picks.append([int(row["text"].split()[1]) for row in read_rows(out)])
    assert picks[0] == picks[1] == sorted(picks[0]) and len(picks[0]) == 5


def test_unknown_dataset_and_unused_option(tmp_path, capsys):
    source = write_jsonl(tmp_path / "nq.jsonl", helmet_kilt_rows((0.0,)))
    assert "Did you mean kilt_nq" in failure(capsys, "kilt-nq", source, tmp_path / "o.jsonl")
    stderr = failure(capsys, "kilt_nq", source, tmp_path / "o.jsonl", "--qrels", source)
    assert "--qrels is not used by kilt_nq; it applies to msmarco" in stderr
    assert "does not exist" in failure(capsys, "kilt_nq", tmp_path / "missing.jsonl",
                                       tmp_path / "o.jsonl")
    assert "is one of the input files" in failure(capsys, "kilt_nq", source, source)


def test_list_names_every_dataset_with_its_key_and_task(capsys):
    code, stdout, _ = run_cli(capsys, "list")
    assert code == 0
    for spec in DATASETS.values():
        assert f"{spec.name}: " in stdout
        assert f"--metadata {spec.metadata_key} (task {spec.task})" in stdout
    assert {"kilt_nq", "kilt_triviaqa", "kilt_hotpotqa", "kilt_popqa", "msmarco", "trec_coarse",
            "trec_fine", "banking77", "clinc150", "nlu", "narrativeqa", "infbench_qa",
            "infbench_choice", "infbench_sum", "multi_lexsum", "squad", "hotpotqa",
            "alce_asqa", "alce_qampari"} == set(DATASETS)


def test_python_api_returns_the_counts(tmp_path):
    source = write_jsonl(tmp_path / "nq.jsonl", helmet_kilt_rows((0.0, 1.0)))
    report = convert_file("kilt_nq", source, tmp_path / "nq.out.jsonl", Options())
    assert (report.read, report.written, sum(report.skipped.values())) == (4, 2, 2)


def test_console_script_points_at_main():
    """The installed `acadlm-eval-data` entry point (pip install -e . reads pyproject.toml)
    resolves to this CLI's main, on every supported Python."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="acadlm-eval-data")
    assert script.load() is main
