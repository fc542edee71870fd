"""Stage 01 for classification when labels are few: a teacher writes labelled rows for each label of data.labels.

Each request asks for one example of one label, the attributes the user controls (synthesize.labelled: length, tone,
sub-topic) asked for in turn, with a few real rows as examples of style and format (their labels hidden); each row
keeps what it was asked for in `attributes`. The teacher writes the row's fields under the data's own column names
(data.question_field, data.passages_field), so the rows are rendered like the real ones. Cleaning, each step counted
per label: length (question and passage), language, copies of real training rows (small teachers copy the style
examples), near duplicates within a label and then across labels (a text written for two labels teaches neither),
decontamination against the eval texts, and the label check: the teacher
classifies each row without seeing its label, and a row whose label it does not confirm is dropped. Evaluation stays
on real rows. Leaf-like: no stage module is imported (build.py calls this).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tunebook.dataset.synthetic import SynthesisError, contaminated, language_of, near_duplicates, normalize
from tunebook.metrics import loose_normalize
from tunebook.params.schema import Params
from tunebook.run.rows import read_jsonl, write_jsonl

WRITE_PROMPT = """Write one {length}example for a text classifier{tone}. Its correct label is "{label}"{meaning}; the other labels are {others}, and yours must clearly be "{label}". {subtopic}
The classifier's task: {task}
{style}This is example {number} of {count} for this label: make it different from the others.
Reply with JSON only, in this form: {shape}"""

CHECK_PROMPT = """Example:
{example}

The task: {task}
The labels: {labels}.
Which label fits the example? Reply with JSON only: {{"label": {choices}}}"""

LABEL_START = '{"label": "'
STYLE_CHARS = 400  # of a real row's passage shown as an example of style: its start, not a whole article


def descriptions(p: Params) -> dict[str, str | None]:
    """{label: its one-line description, or None}, in data.labels' order."""
    labels = p.data.labels
    return dict(labels) if isinstance(labels, dict) else dict.fromkeys(labels or [])


def label_list(p: Params) -> str:
    """The labels in a line, each with its description (in parentheses) where data.labels gives one."""
    return ", ".join(f"{label} ({text})" if text else label for label, text in descriptions(p).items())


def attributes(p: Params, label: str, k: int) -> dict:
    """What request k of a label asks for: lengths, tones and the label's sub-topics taken in turn, so every value
    recurs evenly (length fastest); a sub-topic None: the teacher picks one and names it."""
    s = p.synthesize.labelled
    asked: dict = {}
    if s.lengths:
        asked["length"] = s.lengths[k % len(s.lengths)]
    if s.tones:
        asked["tone"] = s.tones[(k // max(1, len(s.lengths))) % len(s.tones)]
    topics = s.subtopics.get(label) or []
    asked["subtopic"] = topics[k % len(topics)] if topics else None
    return asked


def example_json(p: Params, question: str, passage: str, limit: int | None = None) -> str:
    """A row's text as the teacher reads and writes it: its two fields under the data's column names."""
    d = p.data
    return json.dumps({d.question_field: question, d.passages_field: passage[:limit] if limit else passage}, ensure_ascii=False)


def write_prompt(p: Params, label: str, k: int, asked: dict, style_rows: list[dict]) -> list[dict]:
    d, s = p.data, p.synthesize.labelled
    meaning = descriptions(p)[label]
    others = [x for x in d.label_names if x != label]
    style = ""
    if style_rows:
        shown = "\n".join(example_json(p, r["question"], " ".join(r["passages"]), STYLE_CHARS) for r in style_rows)
        style = f"Real examples of inputs, for their style and format only (their labels are not shown):\n{shown}\n"
    shape = {d.question_field: "...", d.passages_field: "..."} | ({} if asked["subtopic"] else {"subtopic": "..."})
    text = WRITE_PROMPT.format(
        length=f"{asked['length']} " if "length" in asked else "",
        tone=f", in a {asked['tone']} tone" if "tone" in asked else "",
        label=label,
        meaning=f" ({meaning})" if meaning else "",
        others=", ".join(others) or "none",
        subtopic=f"It is about {asked['subtopic']}." if asked["subtopic"] else 'Pick what in this label it is about, and name it in "subtopic".',
        task=p.prompt.instruction,
        style=style,
        number=k + 1,
        count=s.examples_per_label,
        shape=json.dumps(shape, ensure_ascii=False),
    )
    return [{"role": "user", "content": text}]


def check_prompt(p: Params, question: str, passage: str) -> list[dict]:
    d = p.data
    example = f"{d.question_field}: {question}\n{d.passages_field}: {passage}"
    choices = " or ".join(json.dumps(label, ensure_ascii=False) for label in d.label_names)
    text = CHECK_PROMPT.format(example=example, task=p.prompt.instruction, labels=label_list(p), choices=choices)
    return [{"role": "user", "content": text}]


def flat_text(value) -> str | None:
    """A reply field as text: a string, or the strings inside a nested object or list (small teachers nest them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        parts = [flat_text(v) for v in value]
        return " ".join(x for x in parts if x) or None
    return None


def parse_example(reply: str, question_field: str, passages_field: str) -> dict | None:
    """The question, passage (and sub-topic, when the teacher named one) in a teacher's reply, parsed tolerantly
    (json_repair); None when either text is missing."""
    import json_repair

    data = json_repair.loads(reply.strip()) if reply.strip() else None
    if isinstance(data, list):
        data = next((item for item in data if isinstance(item, dict)), None)
    if not isinstance(data, dict):
        return None
    found = {key: flat_text(data.get(field)) for key, field in (("question", question_field), ("passage", passages_field), ("subtopic", "subtopic"))}
    if not all(isinstance(found[k], str) and found[k].strip() for k in ("question", "passage")):
        return None
    return {k: " ".join(v.split()) if k != "passage" else v.strip() for k, v in found.items() if isinstance(v, str) and v.strip()}


def parse_label(reply: str, labels: list[str]) -> str | None:
    """The label a teacher's classification reply names: the "label" value (else the whole reply) equal to a label,
    first as written, then loosely (case, width, punctuation, spacing); else the one label it contains (the longest,
    when one label holds another). None: no label, or two unrelated ones."""
    import json_repair

    data = json_repair.loads(reply.strip()) if reply.strip() else None
    value = data.get("label") if isinstance(data, dict) else data if isinstance(data, str) else None
    text = value.strip() if isinstance(value, str) and value.strip() else reply.strip()
    if text in labels:
        return text
    loose = {loose_normalize(label): label for label in labels}
    if loose_normalize(text) in loose:
        return loose[loose_normalize(text)]
    inside = [label for key, label in loose.items() if key and key in loose_normalize(text)]
    inside = [a for a in inside if not any(a != b and loose_normalize(a) in loose_normalize(b) for b in inside)]
    return inside[0] if len(inside) == 1 else None


@dataclass
class LabelledRows:
    examples: list[dict]  # training rows in 01's example format: the kept teacher rows, then the real rows mixed in
    record: dict  # what 01 records (DatasetOutputs.synthetic): requests, cleaning steps, per label, the teacher's tally


def write_labelled_rows(p: Params, real_train: list[dict], evaluation: list[dict], rows_path: Path, recorded_path: Path) -> LabelledRows:
    """The teacher's rows for every label, cleaned (each dropped row keeps the step that dropped it in `dropped_by`,
    all written to rows_path), plus synthesize.labelled.real_rows of the real training rows."""
    from tunebook.teacher.client import Teacher

    s, labels = p.synthesize.labelled, p.data.label_names
    rng = random.Random(p.seed)
    teacher = Teacher(p.synthesize.teacher)
    plan = [(label, k, attributes(p, label, k)) for label in labels for k in range(s.examples_per_label)]
    prompts = [write_prompt(p, label, k, asked, rng.sample(real_train, min(s.style_examples, len(real_train)))) for label, k, asked in plan]
    print(f"Asking the teacher for {s.examples_per_label} rows for each of {len(labels)} labels ({len(plan)} requests)", flush=True)
    replies = teacher.ask(prompts, json_start='{"' + p.data.question_field + '": "', desc="teacher rows")
    rows, failed, unparsed = [], {label: 0 for label in labels}, {label: 0 for label in labels}
    for (label, k, asked), reply in zip(plan, replies):
        if reply.text is None:
            failed[label] += 1
            continue
        found = parse_example(reply.text, p.data.question_field, p.data.passages_field)
        if found is None:
            unparsed[label] += 1
            continue
        kept_attributes = asked | {"subtopic": asked["subtopic"] or found.get("subtopic")}
        rows.append(
            {
                "id": f"teacher-{label}-{k + 1}",
                "label": label,
                "attributes": kept_attributes,
                "question": found["question"],
                "passage": found["passage"],
                "dropped_by": None,
            }
        )
    if sum(failed.values()):
        print(
            f"{sum(failed.values())} teacher request(s) failed (first error: {teacher.tally.errors[0]}); they are not cached, so re-running 01 asks them again."
        )
    if not rows:
        first = teacher.tally.errors[0] if teacher.tally.errors else "none"
        raise SynthesisError(
            f"The teacher gave no usable rows for {len(plan)} requests: {sum(failed.values())} failed, {sum(unparsed.values())} replies had no "
            f"{p.data.question_field} and {p.data.passages_field} in JSON. First error: {first}. Check synthesize.teacher."
        )
    steps = clean_rows(p, rows, real_train, evaluation, teacher)
    write_jsonl(rows_path, rows)
    kept = [r for r in rows if r["dropped_by"] is None]
    if not kept:
        raise SynthesisError(
            f"Cleaning removed all {len(rows)} rows the teacher wrote: "
            + "; ".join(f"{r['step']} -{r['removed']}" for r in steps[1:])
            + f". The rows, each with the step "
            f"that dropped it, are in {rows_path}."
        )
    examples = [
        {
            "id": r["id"],
            "question": r["question"],
            "passages": [r["passage"][: p.data.passage_max_chars]],
            "answers": [r["label"]],
            "group": r["id"],
            "attributes": r["attributes"],
        }
        for r in kept
    ]
    real = real_train if s.real_rows is None else random.Random(p.seed).sample(real_train, min(s.real_rows, len(real_train)))
    print("Cleaning: " + " → ".join(f"{r['kept']}" for r in steps) + f" rows kept; {len(real)} real training rows beside them")
    record = {
        "kind": "labelled",
        "labels": labels,
        "examples_per_label": s.examples_per_label,
        "requests": len(plan),
        "failed_requests": sum(failed.values()),
        "unparsed_replies": sum(unparsed.values()),
        "steps": steps,
        "per_label": per_label(rows, labels, failed, unparsed, steps),
        "real_rows": len(real),
        "teacher": teacher.tally.summary(),
        "rows_jsonl": str(recorded_path),
    }
    return LabelledRows(examples + real, record)


def clean_rows(p: Params, rows: list[dict], real_train: list[dict], evaluation: list[dict], teacher) -> list[dict]:
    """Each cleaning step in turn over the rows still kept, marking a dropped row's dropped_by with the step's name;
    the steps with the rows each kept and removed."""
    c, labels = p.synthesize.clean, p.data.label_names
    steps = [{"step": "parsed from the teacher's replies", "kept": len(rows), "removed": 0}]

    def step(name: str, drop) -> None:
        alive = [r for r in rows if r["dropped_by"] is None]
        dropped = drop(alive) if alive else []
        for i in dropped:
            alive[i]["dropped_by"] = name
        steps.append({"step": name, "kept": len(alive) - len(dropped), "removed": len(dropped)})

    def text(r: dict) -> str:
        return f"{r['question']}\n{r['passage']}"

    def length_ok(r: dict) -> bool:
        return c.min_question_chars <= len(r["question"]) <= c.max_question_chars and c.min_passage_chars <= len(r["passage"]) <= c.max_passage_chars

    def within_labels(rs: list[dict]) -> list[int]:
        dropped = []
        for label in labels:
            same = [i for i, r in enumerate(rs) if r["label"] == label]
            dropped += [same[j] for j in near_duplicates([text(rs[i]) for i in same], threshold=c.near_duplicate_threshold)]
        return sorted(dropped)

    step("length", lambda rs: [i for i, r in enumerate(rs) if not length_ok(r)])
    if c.language:
        step(f"language {c.language}", lambda rs: [i for i, r in enumerate(rs) if language_of(text(r).replace("\n", " ")) != c.language])
    if real_train:  # a small teacher copies the style examples it is shown: a real row under another label, maybe
        real = [f"{e['question']}\n{' '.join(e['passages'])}" for e in real_train]
        step("near duplicate of a real training row", lambda rs: copies_of([text(r) for r in rs], real, c.near_duplicate_threshold))
    step("near duplicate within its label", within_labels)
    step("near duplicate of another label's row", lambda rs: near_duplicates([text(r) for r in rs], threshold=c.near_duplicate_threshold))
    if evaluation:
        references = [" ".join([e["question"], *e["passages"]]) for e in evaluation]
        trained = [f"{r['question']} {r['passage'][: p.data.passage_max_chars]}" for r in rows]  # as the model will see them
        by_row = {id(r): t for r, t in zip(rows, trained)}
        step("shares an n-gram with an eval text", lambda rs: contaminated([by_row[id(r)] for r in rs], references, n=c.decontamination_ngram))
    if p.synthesize.labelled.label_check:

        def unconfirmed(rs: list[dict]) -> list[int]:
            replies = teacher.ask([check_prompt(p, r["question"], r["passage"]) for r in rs], json_start=LABEL_START, desc="teacher label check")
            for r, reply in zip(rs, replies):
                r["checked_label"] = parse_label(reply.text, labels) if reply.text is not None else None
            return [i for i, r in enumerate(rs) if r["checked_label"] != r["label"]]

        step("label not confirmed by the teacher", unconfirmed)
    return steps


def copies_of(texts: list[str], references: list[str], threshold: float, num_perm: int = 128) -> list[int]:
    """Indices of texts whose character 5-grams overlap a reference text's by Jaccard >= threshold (MinHash LSH over
    the references, as synthetic.near_duplicates does among texts)."""
    from datasketch import MinHash, MinHashLSH

    def signature(text: str) -> MinHash:
        key = normalize(text)
        found = MinHash(num_perm=num_perm, seed=1)
        found.update_batch(key[j : j + 5].encode("utf-8") for j in range(max(1, len(key) - 4)))
        return found

    lsh, kept = MinHashLSH(threshold=threshold, num_perm=num_perm), {}
    for i, reference in enumerate(references):
        kept[str(i)] = signature(reference)
        lsh.insert(str(i), kept[str(i)])
    flagged = []
    for i, text in enumerate(texts):
        mine = signature(text)
        if any(kept[k].jaccard(mine) >= threshold for k in lsh.query(mine)):  # LSH candidates checked against the threshold
            flagged.append(i)
    return flagged


def per_label(rows: list[dict], labels: list[str], failed: dict, unparsed: dict, steps: list[dict]) -> list[dict]:
    """Per label: requests that failed or held no row, the rows each cleaning step dropped, and the rows kept."""
    table = []
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        row = {"label": label, "requests failed": failed[label], "replies without a row": unparsed[label], "written": len(mine)}
        row |= {s["step"]: sum(r["dropped_by"] == s["step"] for r in mine) for s in steps[1:]}
        table.append(row | {"kept": sum(r["dropped_by"] is None for r in mine)})
    return table


def wrote_rows(built) -> bool:
    """Whether 01 built this dataset from rows a teacher wrote for the labels (synthesize.labelled)."""
    return bool(built.summary.synthetic) and built.summary.synthetic.get("kind") == "labelled"


def label_table(built):
    """01: per label, the rows written, dropped by each cleaning step, and kept."""
    import pandas as pd

    return pd.DataFrame(built.summary.synthetic["per_label"]).set_index("label")


def sample_rows(built, per_label: int = 3):
    """01: a few rows of each label as the teacher wrote them, kept or dropped (and why), with their attributes."""
    import pandas as pd

    rows = read_jsonl(Path(built.summary.synthetic["rows_jsonl"]))
    shown = []
    for label in built.summary.synthetic["labels"]:
        for r in [r for r in rows if r["label"] == label][:per_label]:
            extra = {"teacher's label": r.get("checked_label", "")} if "checked_label" in r else {}
            shown.append(
                {
                    "label": label,
                    **{k: r["attributes"].get(k) for k in ("length", "tone", "subtopic")},
                    "question": r["question"],
                    "passage": r["passage"][:160],
                }
                | extra
                | {"dropped by": r["dropped_by"] or ""}
            )
    return pd.DataFrame(shown)
