"""Answer metrics, pure Python (no torch): SQuAD v1.1 exact match and token F1, and partial match.

`normalize_answer`, EM and F1 follow the official SQuAD v1.1 evaluation script exactly (lower-case, drop ASCII
punctuation, drop the words a/an/the, collapse whitespace; max over the gold answers). It is re-written here
rather than imported because the official script is not a package and HF `evaluate` fetches metric code from
the hub at run time, which fails offline; tests/test_metrics.py checks it against the official values.
"""
from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def partial_match(prediction: str, gold: str) -> float:
    """1 when the normalized gold occurs inside the normalized prediction (the answer is there, maybe with more)."""
    gold_norm = normalize_answer(gold)
    if not gold_norm:
        return exact_match(prediction, gold)
    return float(gold_norm in normalize_answer(prediction))


def score(prediction: str, golds: list[str]) -> dict[str, float]:
    """Per-example scores, each the max over the gold answers (as the SQuAD script does)."""
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return {
        "exact_match": max(exact_match(prediction, g) for g in golds),
        "partial_match": max(partial_match(prediction, g) for g in golds),
        "f1": max(token_f1(prediction, g) for g in golds),
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = ("exact_match", "partial_match", "f1")
    if not rows:
        return {k: 0.0 for k in keys}
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}
