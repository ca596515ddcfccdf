"""Scores for the long-context tasks, on a 0-100 scale, computed without a model or a judge.

RULER scores a generation by whether the expected strings occur in it: ``match_all`` gives the
share of references found, ``match_part`` full credit if any is. HELMET adds substring exact
match, exact match, token F1 and ROUGE-L/ROUGE-Lsum (each the better of the whole generation
and the answer line it reads out of it), its multiple-choice rule, NDCG@10 for re-ranking
(trec_eval's definition) and, for its ``cite`` category,
ALCE's metrics (Gao et al. 2023): STR-EM for ASQA, answer-list precision/recall/F1 for QAMPARI,
and citation recall/precision, which need an entailment model passed in by the caller.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f]")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_prediction(text: str) -> str:
    """Strip the generation and turn control characters into line breaks, as RULER does."""
    return _CONTROL.sub("\n", text.strip()).strip()


def match_all(prediction: str, references: Sequence[str]) -> float:
    """100 x the share of ``references`` that occur in ``prediction`` (case-insensitive)."""
    if not references:
        return 0.0
    lowered = clean_prediction(prediction).lower()
    return 100.0 * sum(ref.lower() in lowered for ref in references) / len(references)


def match_part(prediction: str, references: Sequence[str]) -> float:
    """100 if any of ``references`` occurs in ``prediction`` (case-insensitive), else 0."""
    lowered = clean_prediction(prediction).lower()
    return 100.0 if any(ref.lower() in lowered for ref in references) else 0.0


def normalize_answer(text: str) -> str:
    """Lowercase, delete ASCII punctuation, drop articles, squeeze spaces: the SQuAD
    normalization that HELMET and ALCE compare answers with ("Wal-Mart" and "walmart" agree)."""
    text = text.lower().translate(_NO_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def substring_exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if a normalized reference is a substring of the normalized prediction, else 0."""
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalize_answer(ref) and normalize_answer(ref) in normalized
                        for ref in references) else 0.0


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """100 x the best ROUGE-L F1 of ``prediction`` against ``references`` (rouge-score)."""
    return 100.0 * max((_rouge_scorer().score(ref, prediction)["rougeL"].fmeasure
                        for ref in references), default=0.0)


def rouge_measures(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """HELMET's ROUGE measures of ``prediction`` (``utils.calculate_metrics``), 0-100: F1 and
    recall of ROUGE-L and of ROUGE-Lsum (whose sentences are the lines of the texts), each the
    best over ``references``, with Porter stemming as rouge-score applies it."""
    scores = [_rouge_scorer().score(ref, prediction) for ref in references]
    found = {}
    for kind in ("rougeL", "rougeLsum"):
        found[f"{kind}_f1"] = 100.0 * max((s[kind].fmeasure for s in scores), default=0.0)
        found[f"{kind}_recall"] = 100.0 * max((s[kind].recall for s in scores), default=0.0)
    return found


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalized prediction equals a normalized reference (SQuAD's exact match)."""
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(ref) for ref in references) else 0.0


_CLOSED_ANSWERS = ("yes", "no", "noanswer")


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """100 x the best SQuAD token F1 over ``references``; a yes/no/noanswer answer on either
    side scores only when both sides agree exactly, as HELMET's ``f1_score`` rules."""
    predicted = normalize_answer(prediction)
    best = 0.0
    for reference in references:
        truth = normalize_answer(reference)
        if (predicted in _CLOSED_ANSWERS or truth in _CLOSED_ANSWERS) and predicted != truth:
            continue
        common = Counter(predicted.split()) & Counter(truth.split())
        same = sum(common.values())
        if same:
            precision, recall = same / len(predicted.split()), same / len(truth.split())
            best = max(best, 2 * precision * recall / (precision + recall))
    return 100.0 * best


def answer_line(output: str, prefix: str = "Answer:") -> str:
    """The answer HELMET reads out of a generation (``utils.parse_output``): the rest of the
    line after the first ``prefix`` (in any case), else the first line; a prefix the model
    repeats at its start is dropped."""
    found = re.search(re.escape(prefix) + r"(.*)", output, flags=re.IGNORECASE)
    line = (found.group(1) if found else output.split("\n", 1)[0]).strip()
    if line.lower().startswith(prefix.lower()):
        line = line[len(prefix):]
    return line.strip()


def helmet_answer_scores(prediction: str, references: Sequence[str], *,
                         prefix: str = "Answer:") -> dict[str, float]:
    """HELMET's model-free scores of a long-document answer or summary, 0-100: exact match,
    token F1, substring exact match and the ROUGE measures of :func:`rouge_measures`, each the
    better of the whole generation and of the line :func:`answer_line` reads out of it (HELMET
    scores both and keeps the maximum)."""

    def scores(text: str) -> dict[str, float]:
        return {"exact_match": exact_match(text, references),
                "f1": token_f1(text, references),
                "substring_exact_match": substring_exact_match(text, references),
                **rouge_measures(text, references)}

    whole, line = scores(prediction), scores(answer_line(prediction, prefix))
    return {name: max(value, line[name]) for name, value in whole.items()}


def choice_exact_match(prediction: str, letter: str, option: str) -> float:
    """HELMET's score of a multiple-choice answer (InfiniteBench En.MC), 0 or 100: the whole
    generation, or the line :func:`answer_line` reads, equals the letter (``B``) or the
    lettered option (``B. text``) after normalization, or the lettered option occurs in the
    generation (case-insensitive)."""
    lettered = f"{letter}. {option}"
    references = (letter, lettered)
    if lettered.lower() in prediction.lower():
        return 100.0
    return max(exact_match(prediction, references),
               exact_match(answer_line(prediction), references))


def ndcg_at_k(ranking: Sequence[str], relevance: Mapping[str, float], k: int = 10) -> float:
    """100 x NDCG@k of a ranked list of ids against graded ``relevance``, as trec_eval's
    ``ndcg_cut`` (and so pytrec_eval, which HELMET scores re-ranking with) defines it.

    The gain of a document is its relevance grade itself (linear gain, not 2^grade - 1), the
    document at rank r (from 1) is discounted by log2(r + 1), ids that were not judged count 0,
    and an id repeated in the ranking counts at its first rank only. The ideal ranking orders
    all judged grades from the highest, so a ranking that leaves out a relevant document is
    penalised (Järvelin & Kekäläinen 2002; trec_eval 9, ``m_ndcg_cut.c``).
    """
    seen: set[str] = set()
    unique = [doc for doc in ranking if not (doc in seen or seen.add(doc))]
    gains = [max(relevance.get(doc, 0.0), 0.0) for doc in unique[:k]]
    ideal = sorted((grade for grade in relevance.values() if grade > 0), reverse=True)[:k]
    idcg = _dcg(ideal)
    return 100.0 * _dcg(gains) / idcg if idcg > 0 else 0.0


def _dcg(gains: Sequence[float]) -> float:
    return sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))


# ------------------------------------------------------------------ ALCE (HELMET's `cite`)

_CITATION = re.compile(r"\s*\[\d+(?:\s*[,;]\s*\d+)*\]")
_CITED_ID = re.compile(r"\[(\d+)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def strip_citations(text: str) -> str:
    """``text`` without its bracketed citation marks ("[1]", "[2][3]", "[1, 2]"): ALCE judges
    the correctness of an answer on its words alone."""
    return _CITATION.sub("", text)


def alce_answer(prediction: str) -> str:
    """A generation as ALCE scores it: line breaks become spaces (a multi-line answer is one
    answer), surrounding whitespace goes."""
    return re.sub(r"\s*\n\s*", " ", prediction).strip()


def asqa_string_em(prediction: str, short_answers: Sequence[Sequence[str]]) -> tuple[float, float]:
    """ALCE's STR-EM and STR-HIT for ASQA (Gao et al. 2023, §4.1), both 0-100.

    ASQA splits an ambiguous question into sub-questions, each with a set of acceptable short
    answers. STR-EM is the share of sub-questions for which some short answer occurs, after
    :func:`normalize_answer`, in the normalized generation (citations removed); STR-HIT is 100
    when all of them do.
    """
    if not short_answers:
        return 0.0, 0.0
    text = normalize_answer(strip_citations(alce_answer(prediction)))
    found = [any(normalize_answer(a) and normalize_answer(a) in text for a in answers)
             for answers in short_answers]
    share = sum(found) / len(found)
    return 100.0 * share, 100.0 if all(found) else 0.0


@dataclass(frozen=True)
class AnswerListScores:
    """ALCE's scores of a comma-separated answer list against QAMPARI's answers, 0-100."""

    precision: float
    recall: float
    recall_top5: float
    f1: float
    f1_top5: float
    num_predictions: int


def qampari_scores(prediction: str, answers: Sequence[Sequence[str]]) -> AnswerListScores:
    """Precision, recall and F1 of a generated answer list (ALCE's QAMPARI metrics).

    The generation (citations removed, a final period or comma dropped) is split at commas and
    each item normalized; empty items go. Each answer of ``answers`` is a set of aliases.
    Precision: the share of predicted items equal to some alias of some answer (a repeated item
    counts each time). Recall: the share of answers with an alias among the items. Recall-top5
    caps both counts at 5, since a question may have dozens of answers and the prompt asks for
    at least 5: min(5, answers found) / min(5, answers). F1 and F1-top5 combine precision with
    each recall. HELMET's `cite` category uses recall-top5.
    """
    text = strip_citations(alce_answer(prediction)).rstrip().rstrip(".").rstrip(",")
    items = [normalize_answer(item) for item in text.split(",")]
    items = [item for item in items if item]
    aliases = [{normalize_answer(alias) for alias in group} for group in answers]
    every_alias = set().union(*aliases) if aliases else set()
    precision = sum(item in every_alias for item in items) / len(items) if items else 0.0
    found = sum(bool(group & set(items)) for group in aliases)
    recall = found / len(aliases) if aliases else 0.0
    recall_top5 = min(5, found) / min(5, len(aliases)) if aliases else 0.0
    return AnswerListScores(100.0 * precision, 100.0 * recall, 100.0 * recall_top5,
                            100.0 * _harmonic(precision, recall),
                            100.0 * _harmonic(precision, recall_top5), len(items))


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


#: Decides whether a premise entails a hypothesis (an NLI model, or a judge).
Entails = Callable[[str, str], bool]


@dataclass(frozen=True)
class CitationScores:
    """ALCE's citation recall and precision of one answer, 0-100."""

    recall: float
    precision: float


def answer_statements(prediction: str, *, list_question: str | None = None) -> list[str]:
    """The statements of an answer whose citations are checked, as ALCE cuts them: sentences
    of 5 characters or more, or, for an answer list (``list_question`` given, QAMPARI), each
    item prefixed with the question so that it reads as a claim."""
    text = alce_answer(prediction)
    if list_question is not None:
        items = text.rstrip().rstrip(".").rstrip(",").split(",")
        return [f"{list_question} {item.strip()}" for item in items if item.strip()]
    return [sentence for sentence in _SENTENCE_END.split(text) if len(sentence.strip()) >= 5]


def citation_scores(prediction: str, documents: Sequence[tuple[str, str]], entails: Entails, *,
                    list_question: str | None = None,
                    at_most: int = 3) -> CitationScores | None:
    """ALCE's citation recall and precision (Gao et al. 2023, §4.2), None for an empty answer.

    ``documents`` are the (title, text) of the passages shown, numbered from 1 in the prompt.
    A statement is *supported* when the passages it cites (the first ``at_most``) together
    entail it, with its citation marks removed; a statement without a citation, or citing a
    number no passage has, is not. Recall is the share of supported statements. A citation is
    *precise* unless it is redundant: in a supported statement with several citations, a
    passage that does not entail the statement alone while the other cited passages do. In a
    supported statement with one citation, that citation is precise. Precision is the share of
    precise citations among all citations counted (0 when there are none).
    """
    statements = answer_statements(prediction, list_question=list_question)
    if not statements:
        return None

    def passage(ids: Sequence[int]) -> str:
        return "\n".join(f"Title: {documents[i][0]}\n{documents[i][1]}" for i in ids)

    supported = precise = cited = 0
    for statement in statements:
        claim = strip_citations(statement).strip()
        ids = [int(number) - 1 for number in _CITED_ID.findall(statement)]
        if not ids or any(not 0 <= i < len(documents) for i in ids):
            continue
        ids = ids[:at_most]
        cited += len(ids)
        if not entails(passage(ids), claim):
            continue
        supported += 1
        if len(ids) == 1:
            precise += 1
            continue
        for i in ids:
            others = [j for j in ids if j != i]
            if entails(passage([i]), claim) or not entails(passage(others), claim):
                precise += 1
    return CitationScores(100.0 * supported / len(statements),
                          100.0 * precise / cited if cited else 0.0)
