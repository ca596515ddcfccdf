"""Scores for the long-context tasks, on a 0-100 scale, computed without a model or a judge.

RULER scores a generation by whether the expected strings occur in it: ``match_all`` gives the
share of references found, ``match_part`` full credit if any is. HELMET adds substring exact
match, ROUGE-L and NDCG@10 for re-ranking.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


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
    """Lowercase, drop punctuation and articles, squeeze spaces (the SQuAD normalization)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def substring_exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if a normalized reference is a substring of the normalized prediction, else 0."""
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalize_answer(ref) and normalize_answer(ref) in normalized
                        for ref in references) else 0.0


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """100 x the best ROUGE-L F1 of ``prediction`` against ``references`` (rouge-score)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references),
                       default=0.0)


def ndcg_at_k(ranking: Sequence[str], relevance: dict[str, float], k: int = 10) -> float:
    """100 x NDCG@k of a ranked list of ids against graded ``relevance`` (missing ids count 0)."""
    seen: set[str] = set()
    unique = [doc for doc in ranking if not (doc in seen or seen.add(doc))]
    gains = [relevance.get(doc, 0.0) for doc in unique[:k]]
    dcg = sum((2**gain - 1) / math.log2(rank + 2) for rank, gain in enumerate(gains))
    ideal = sorted(relevance.values(), reverse=True)[:k]
    idcg = sum((2**gain - 1) / math.log2(rank + 2) for rank, gain in enumerate(ideal))
    return 100.0 * dcg / idcg if idcg > 0 else 0.0
