"""The teacher as a judge of answers: a score from 1 to 5 per answer against a rubric.

04 uses it as a metric for long answers (evaluate.judge: beside ROUGE-L and the embedding similarity, the question and
the gold answers shown to the judge), and the self-improvement rounds as a filter for answers to unlabelled questions
(rounds.judge_min_score: the question and its passages shown instead). The teacher (synthesize.teacher, an endpoint or
a local model) keeps every reply in its disk cache, so scoring the same answers again costs nothing. An empty answer
gets 1 without asking; a reply without a score leaves the answer unscored (None), counted and never guessed.
"""

from __future__ import annotations

import json

from tunebook.dataset.synthetic import JUDGE_START, parse_score
from tunebook.params.schema import TeacherParams

ANSWER_PROMPT = """Rate the answer below from 1 (worst) to 5 (best) by this rubric: {rubric}
Reply with JSON only: {{"score": <1 to 5>, "reason": "<one sentence>"}}

{context}Question: {question}
{reference}Answer to rate: {answer}"""

# Rounds: no gold answer to compare with, so the judge reads the question's passages instead.
UNLABELLED_RUBRIC = (
    "A 5 answers the question completely and correctly, as the passages support it, in the form the question asks for; "
    "a 3 is partly right or adds what the passages do not say; a 1 is wrong, off the subject, empty or rambling."
)
PASSAGE_CHARS = 2000  # of the passages shown to the judge: enough for the answer's evidence, not a whole article


def judge_prompt(question: str, answer: str, rubric: str, golds: list[str] = (), passages: list[str] = ()) -> list[dict]:
    """The judge's conversation for one answer: the rubric, the passages (if any, cut), the question, the reference
    answers (if any) and the answer."""
    context = "Passages:\n" + "\n\n".join(passages)[:PASSAGE_CHARS] + "\n\n" if passages else ""
    reference = "".join(f"Reference answer: {g}\n" for g in golds)
    text = ANSWER_PROMPT.format(rubric=rubric, context=context, question=question, reference=reference, answer=answer)
    return [{"role": "user", "content": text}]


def judge_answers(teacher, items: list[dict], rubric: str, desc: str = "judge") -> list[int | None]:
    """A score 1-5 (or None: the reply held none) for each item {question, answer, golds?, passages?}, in order."""
    prompts = {}  # each distinct prompt asked once: a question's samples often give the same answer
    for i, item in enumerate(items):
        if item["answer"].strip():
            conversation = judge_prompt(item["question"], item["answer"], rubric, item.get("golds", ()), item.get("passages", ()))
            prompts.setdefault(json.dumps(conversation, ensure_ascii=False), (conversation, []))[1].append(i)
    replies = teacher.ask([c for c, _ in prompts.values()], json_start=JUDGE_START, desc=desc) if prompts else []
    scores: list[int | None] = [1] * len(items)  # an empty answer is the worst one, without asking
    for (_, where), reply in zip(prompts.values(), replies):
        for i in where:
            scores[i] = parse_score(reply.text) if reply.text is not None else None
    return scores


def judge_metric(teacher_params: TeacherParams, examples: list[dict], answers: list[str], rubric: str, label: str) -> tuple[list[int | None], dict]:
    """04's judge column for one model: each answer's score and the summary (judge_score: the mean over the scored
    answers; judge_unscored: answers the judge gave no score, when there are any)."""
    from tunebook.teacher.client import Teacher

    teacher = Teacher(teacher_params)
    items = [{"question": e["question"], "answer": a, "golds": e["answers"]} for e, a in zip(examples, answers)]
    scores = judge_answers(teacher, items, rubric, desc=f"{label}: judge")
    scored = [s for s in scores if s is not None]
    summary = {"judge_score": sum(scored) / len(scored) if scored else 0.0}
    unscored = len(scores) - len(scored)
    if unscored:
        summary["judge_unscored"] = unscored
        print(f"{label}: the judge gave no score for {unscored} of {len(scores)} answers; judge_score is the mean of the others.")
    tally = teacher.tally
    print(f"{label}: judge {tally.requests} requests ({tally.failed} failed), {tally.cache_hits} answered from the cache, cost {tally.cost:.4f}")
    return scores, summary


def judge_table(predictions: dict[str, list[dict]]) -> list[dict]:
    """05: per model with judge scores, their mean and how many answers got each score (and none)."""
    table = []
    for label, rows in predictions.items():
        if not any("judge_score" in r for r in rows):
            continue
        scores = [r.get("judge_score") for r in rows]
        scored = [s for s in scores if s is not None]
        row = {"model": label, "mean": round(sum(scored) / len(scored), 3) if scored else None}
        row |= {str(s): scores.count(s) for s in range(1, 6)}
        table.append(row | {"unscored": scores.count(None), "n": len(rows)})
    return table
