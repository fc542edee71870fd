"""Stage 01: load question/passages/answers rows, validate them, split, render chat prompts, save.

Every row becomes one chat example: the user message holds the instruction, the numbered passages and the
question; the assistant message (the training target) is the first gold answer and nothing else. Rows of a chat
format (data.format messages / sharegpt / alpaca: tunebook.dataset.chat_files) bring their own prompt, the turns before their
last assistant turn, which is the target.
"""

from __future__ import annotations

import csv
import io
import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tunebook.colab.runtime import prepare_stage
from tunebook.dataset.chat_files import conversation_examples, detect_format
from tunebook.dataset.synthetic import passage, synthesize
from tunebook.errors import TunebookError
from tunebook.metrics import SPAN_METRICS, answer_in_passages, loose_normalize
from tunebook.models.families import chat_format, training_tokens
from tunebook.models.tokenizer_check import check_round_trip, row_texts
from tunebook.params.schema import DataParams, Params, PromptParams, RaftParams, format_conflicts
from tunebook.run.files import fresh_tmp_dir, replace_dir
from tunebook.run.folder import Run
from tunebook.run.outputs import DatasetOutputs
from tunebook.run.rows import DataError, field_value, read_jsonl, read_text, write_jsonl

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(path_or_id: str, split: str) -> list[dict]:
    """Rows of a local JSONL/JSON/CSV/Parquet file, or of a hub dataset split."""
    path = Path(path_or_id)
    if path.suffix.lower() in FILE_FORMATS or path.exists():
        if not path.is_file():
            raise DataError(f"Data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix not in FILE_FORMATS:
            raise DataError(f"{path}: unsupported file type '{suffix}'. Use one of {', '.join(FILE_FORMATS)}.")
        if suffix == ".parquet":
            import pandas as pd

            records = pd.read_parquet(path).to_dict("records")
            return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in r.items()} for r in records]  # numpy -> lists
        if suffix == ".jsonl":
            return read_jsonl(path)
        text = read_text(path)
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}.")
            return data
        return list(csv.DictReader(io.StringIO(text, newline="")))  # a quoted cell keeps its line breaks
    return _read_hub(path_or_id, split)


def _read_hub(dataset_id: str, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as e:  # the hub client raises many types; the user needs one sentence
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"'{dataset_id}' is not a local file, and loading it as a hub dataset (split '{split}') failed: {first}") from None


def document_fields(d: DataParams, chunks_path: Path) -> DataParams:
    """The data fields for rows built from documents: the documents' chunks are the retrieval corpus, and real eval
    questions have no oracle passage."""
    corpus = {"corpus_path": str(chunks_path), "id_field": "doc_id", "text_field": "passage"}
    return d.model_copy(update={"retrieval": d.retrieval.model_copy(update=corpus), "raft": RaftParams()})


def row_format(rows: list[dict], fields: DataParams) -> str:
    """data.format, or with auto the format the first row's keys name (chat_files.detect_format)."""
    if fields.format != "auto":
        return fields.format
    return detect_format(rows[0], fields.question_field, fields.answers_field) if rows else "qa"


def data_format(p: Params, train_rows: list[dict], eval_rows: list[dict]) -> str:
    """The labelled rows' format (a teacher's rows are qa): the eval file must be in the same one, and the params must ask
    nothing of it that it cannot give (config.format_conflicts)."""
    fmt = "qa" if p.synthesize.documents_path else row_format(train_rows, p.data)
    mismatch = eval_format_mismatch(p, fmt, eval_rows)
    if mismatch:
        raise DataError(mismatch)
    problems = format_conflicts(p, fmt)
    if problems:
        raise DataError(f"{p.data.train_path}: " + "; ".join(problems) + ".")
    return fmt


def eval_format_mismatch(p: Params, fmt: str, eval_rows: list[dict]) -> str | None:
    """Why the eval rows cannot be scored after training on rows of format `fmt`, or None: one is qa (prompts made by
    prompt.template) and the other a chat format (prompts = the turns). Two chat formats prompt alike."""
    d = p.data
    eval_fmt = row_format(eval_rows, d) if eval_rows else fmt
    if (eval_fmt == "qa") == (fmt == "qa"):
        return None
    train = "the teacher's rows (synthesize.documents_path)" if p.synthesize.documents_path else f"data.train_path's ({d.train_path})"
    return (
        f"data.eval_path ({d.eval_path}) holds {eval_fmt} rows, but {train} are {fmt} rows: the model would be scored on prompts "
        "made another way than those it was trained on (prompt.template's, or a conversation's own turns). Write both files in one format"
        + (", or set data.format to name it." if d.format == "auto" else ".")
    )


def to_examples(rows: list[dict], fields: DataParams, source: str, nfkc: bool, answers_required: bool = True) -> list[dict]:
    """Validate rows and map them to {id, question, passages, answers, group} (chat formats: plus context, the turns of
    their prompt); names the first bad row. answers_required=False: questions without answers (rounds.questions_path),
    whose answers are then empty."""
    if not rows:
        raise DataError(f"{source}: no rows.")
    fmt = row_format(rows, fields)
    if fmt != "qa":
        return conversation_examples(rows, fmt, source, id_field=fields.id_field, group_field=fields.group_field, nfkc=nfkc)
    norm = (lambda s: unicodedata.normalize("NFKC", s)) if nfkc else (lambda s: s)
    retrieved = bool(fields.retrieval.corpus_path)  # passages come from the corpus, not from the row
    wanted = [fields.question_field, *([fields.answers_field] if answers_required else [])]
    wanted += [fields.retrieval.gold_id_field] if retrieved and fields.retrieval.gold_id_field else []
    wanted += [] if retrieved else [fields.passages_field]
    wanted += [fields.group_field] if fields.group_field else []
    examples, seen = [], set()
    for number, row in enumerate(rows, start=1):
        where = f"{source} row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields {wanted}, got {type(row).__name__} {row!r:.60}.")
        values = {f: field_value(row, f) for f in wanted}
        missing = [f for f, v in values.items() if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {missing}. Fields present: {sorted(row)}. "
                "Map your columns with data.question_field / passages_field / answers_field / group_field."
            )
        question = values[fields.question_field]
        if not isinstance(question, str):
            raise DataError(f"{where}: '{fields.question_field}' must be text, got {type(question).__name__}.")
        titles, passages = ([], []) if retrieved else _passages(values[fields.passages_field], where, fields.passages_field)
        answers = _text_list(values[fields.answers_field], where, fields.answers_field) if answers_required else []
        row_id = str(row.get(fields.id_field)) if fields.id_field and row.get(fields.id_field) not in (None, "") else str(number)
        if row_id in seen:
            raise DataError(f"{where}: duplicate id '{row_id}' in field '{fields.id_field}'.")
        seen.add(row_id)
        example = {
            "id": row_id,
            "question": norm(question.strip()),
            "passages": [norm(p)[: fields.passage_max_chars] for p in passages],
            "answers": [norm(a.strip()) for a in answers],
            "group": str(values[fields.group_field]) if fields.group_field else row_id,
        }
        if retrieved and fields.retrieval.gold_id_field:
            example["gold_doc"] = str(values[fields.retrieval.gold_id_field])
        if fields.raft.enabled:
            example.update(_oracle(field_value(row, fields.raft.oracle_field), titles, values[fields.passages_field], where, fields.raft.oracle_field))
        examples.append(example)
    return examples


def _passages(value, where: str, field: str) -> tuple[list[str | None], list[str]]:
    """(titles, texts): plain strings have no title; [title, [sentences]] pairs become 'title: sentences'."""
    if isinstance(value, list) and value and all(_titled_pair(v, list) for v in value):
        return [v[0] for v in value], [f"{v[0]}: {''.join(v[1]).strip()}" for v in value]
    texts = _text_list(value, where, field)
    return [None] * len(texts), texts


def _titled_pair(value, second: type) -> bool:
    """[title, X] with X of type `second`: a HotpotQA paragraph (X = sentences) or fact (X = sentence index)."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], second)


def _oracle(facts, titles: list, raw_passages, where: str, field: str) -> dict:
    """Oracle passage titles and the supporting sentences they quote, from [title, sentence index] pairs."""
    if not isinstance(facts, list) or not facts or not all(_titled_pair(f, int) for f in facts):
        raise DataError(f"{where}: data.raft.oracle_field '{field}' must be a list of [title, sentence index] pairs, got {facts!r:.80}.")
    sentences = {v[0]: v[1] for v in raw_passages if _titled_pair(v, list)}
    missing = sorted({t for t, _ in facts if t not in sentences})
    if missing:
        raise DataError(f"{where}: oracle passage(s) {missing} are not among the row's passages {titles}.")
    quotes = [sentences[t][i].strip() for t, i in facts if i < len(sentences[t])]
    return {"titles": titles, "oracle_titles": sorted({t for t, _ in facts}), "quotes": quotes}


def raft_example(example: dict, raft, rng: random.Random, *, train: bool, answer_prefix: str | None) -> dict:
    """RAFT: keep the oracle passages (dropped for a fraction of training rows) plus k sampled distractors,
    shuffled; the target is a reasoning that quotes the supporting sentences, then the final-answer line."""
    oracle = [i for i, t in enumerate(example["titles"]) if t in example["oracle_titles"]]
    others = [i for i in range(len(example["passages"])) if i not in oracle]
    chosen = rng.sample(others, min(raft.distractors, len(others)))
    keep_oracle = not (train and rng.random() < raft.oracle_drop)
    if keep_oracle:
        chosen += oracle
    rng.shuffle(chosen)
    answer = example["answers"][0]
    if raft.cot:
        quoted = " ".join(f"##begin_quote## {q} ##end_quote##" for q in example["quotes"])
        reasoning = f" {example['reasoning']}" if example.get("reasoning") else ""  # a teacher's, for rows made from documents
        target = f"The passages say: {quoted}{reasoning}\n{answer_prefix} {answer}"  # the params require the prefix with cot
    else:
        target = answer
    kept = {k: v for k, v in example.items() if k not in ("titles", "oracle_titles", "quotes", "reasoning")}
    return {**kept, "passages": [example["passages"][i] for i in chosen], "target": target, "oracle_kept": keep_oracle}


def _text_list(value, where: str, field: str) -> list[str]:
    if isinstance(value, str):
        # CSV cells can hold a JSON list; otherwise one string is one item.
        if value.startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return [value]
        else:
            return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{where}: '{field}' must be a non-empty string or a list of non-empty strings, got {value!r:.80}.")
    return value


def split_examples(examples: list[dict], eval_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split by group: all rows of a group land on the same side."""
    groups = sorted({e["group"] for e in examples})
    random.Random(seed).shuffle(groups)
    n_rows = len(examples)
    want = round(eval_size * n_rows) if eval_size < 1 else int(eval_size)
    if want >= n_rows:
        raise DataError(f"data.eval_size={eval_size} leaves no training rows ({n_rows} rows in all).")
    sizes = {}
    for e in examples:
        sizes[e["group"]] = sizes.get(e["group"], 0) + 1
    eval_groups, taken = set(), 0
    for g in groups:
        if taken >= want:
            break
        eval_groups.add(g)
        taken += sizes[g]
    train = [e for e in examples if e["group"] not in eval_groups]
    evaluation = [e for e in examples if e["group"] in eval_groups]
    return train, evaluation


@dataclass(frozen=True)
class Overlap:
    """An eval row that repeats a training row, matched by its id and/or its question (with a gold answer in common)."""

    eval_id: str
    train_id: str
    question: str
    train_question: str
    by: tuple[str, ...]  # ("id",), ("question",) or ("id", "question")


class EvalOverlapError(DataError):
    """The eval split repeats training rows and data.allow_eval_overlap is false."""


def eval_overlap(
    train_rows: list[dict],
    eval_rows: list[dict],
    id_field: str | None = "id",
    question_field: str = "question",
    answers_field: str = "answers",
    match_ids: bool = True,
) -> list[Overlap]:
    """The eval rows that repeat a training row, in eval order: the same id (when `id_field` is given; rows without one
    are not compared by id), or the same question with a gold answer in common, both after metrics.loose_normalize
    (NFKC, case, width, punctuation and spacing ignored). The question alone is not enough: an FAQ can hold one heading
    twice with different answers, and a short generic question recurs over other passages; neither gives the eval answer
    away. Takes raw rows (pass the data.*_field names; a sample of each file will do) or 01's examples (the defaults).
    Rows are named by their id, else by row number; match_ids=False names them by id without comparing ids (ids that
    are unique already, in a split of one file, or of our making)."""

    def ident(row):
        value = row.get(id_field) if id_field else None
        return None if value in (None, "") else str(value)

    def question(row) -> str:
        value = field_value(row, question_field)
        return value.strip() if isinstance(value, str) else ""

    def golds(row) -> set[str]:
        value = field_value(row, answers_field)
        if isinstance(value, str) and value.startswith("["):
            try:
                value = json.loads(value)  # a CSV cell holding a JSON list
            except json.JSONDecodeError:
                pass
        texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
        return {loose_normalize(t) for t in texts} - {""}

    by_id, by_question = {}, {}
    for number, row in enumerate(train_rows, start=1):
        entry = (ident(row) or f"row {number}", question(row), golds(row))
        if match_ids and ident(row) is not None:
            by_id.setdefault(ident(row), entry)
        if loose_normalize(entry[1]):
            by_question.setdefault(loose_normalize(entry[1]), []).append(entry)
    found = []
    for number, row in enumerate(eval_rows, start=1):
        eval_id, text, answers = ident(row), question(row), golds(row)
        same_id = by_id.get(eval_id) if eval_id is not None else None
        same_question = next((t for t in by_question.get(loose_normalize(text), []) if t[2] & answers), None) if loose_normalize(text) else None
        if same_id or same_question:
            train = same_id or same_question
            by = tuple(k for k, hit in (("id", same_id), ("question", same_question)) if hit)
            found.append(Overlap(eval_id=eval_id or f"row {number}", train_id=train[0], question=text, train_question=train[1], by=by))
    return found


def check_eval_overlap(train: list[dict], evaluation: list[dict], p: Params, real_ids: bool) -> dict:
    """Stop (EvalOverlapError) when eval examples repeat training examples, unless data.allow_eval_overlap; the record
    01 keeps. `real_ids`: the two files' examples carry their own ids, which name the same row in both (not row numbers)."""
    overlaps = eval_overlap(train, evaluation, match_ids=real_ids)
    record = {"rows": len(overlaps), "of": len(evaluation), "ids": [o.eval_id for o in overlaps[:20]], "allowed": p.data.allow_eval_overlap}
    if not overlaps:
        return record
    d = p.data
    head = f"{len(overlaps)} of {len(evaluation)} eval rows repeat a training row"
    if d.allow_eval_overlap:
        print(f"Note: {head} (data.allow_eval_overlap: true, so they are scored anyway; their ids are in the 01 outputs, eval_overlap).")
        return record
    by_id = sum("id" in o.by for o in overlaps)
    by_question = sum("question" in o.by for o in overlaps)
    how = ", ".join(x for x in (f"{by_id} by id" if by_id else "", f"{by_question} by question with the same gold answer" if by_question else "") if x)
    lines = [f"{head} ({how}; case, width, punctuation and spacing ignored), so their scores would count answers the model was trained on. For example:"]
    for o in overlaps[:3]:
        also = f" (training: {o.train_question[:100]!r})" if "question" not in o.by else ""
        lines.append(f"  - eval id {o.eval_id!r}, training id {o.train_id!r}: {o.question[:100]!r}{also}")
    way_out = "or set data.allow_eval_overlap: true if the overlap is intended."
    if not d.eval_path:
        lines.append(
            f"data.train_path ({d.train_path}) holds these rows more than once, and the copies fell on both sides of the data.eval_size split. "
            f"Fix the file (remove the duplicate rows), {way_out}"
        )
    else:
        source = (
            f"data.train_path ({d.train_path})"
            if d.train_path
            else f"the rows the teacher wrote from synthesize.documents_path ({p.synthesize.documents_path})"
        )
        lines.append(
            f"data.eval_path ({d.eval_path}) overlaps {source}. Fix the files (remove these rows from one of them, or point data.eval_path "
            f"at a separate eval set), {way_out}"
        )
    id_only = sum(o.by == ("id",) for o in overlaps)
    if id_only:
        lines.append(
            f"{id_only} of them share only the id (data.id_field '{d.id_field}'), not the question: if the two files number their rows "
            "independently, their ids name different rows; then set data.id_field to empty (ids = row numbers)."
        )
    raise EvalOverlapError("\n".join(lines))


def retrieve_passages(examples: list[dict], fields: DataParams) -> list[dict]:
    """Each example's passages = the top_k corpus documents for its question (BM25, bm25s); with a gold
    document id, `gold_retrieved` says whether retrieval found it (a miss is not the model's fault)."""
    import bm25s

    r = fields.retrieval
    ids, texts = corpus_documents(read_rows(r.corpus_path, r.corpus_split), fields)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    k = min(r.top_k, len(texts))
    hits, _ = retriever.retrieve(bm25s.tokenize([e["question"] for e in examples], stopwords="en", show_progress=False), k=k, show_progress=False)
    result = []
    for example, found in zip(examples, hits):
        doc_ids = [ids[i] for i in found]
        extra = {"gold_retrieved": example["gold_doc"] in doc_ids} if "gold_doc" in example else {}
        result.append({**example, "passages": [texts[i][: fields.passage_max_chars] for i in found], "doc_ids": doc_ids, **extra})
    return result


def corpus_documents(corpus: list[dict], fields: DataParams) -> tuple[list[str], list[str]]:
    """The retrieval corpus's (ids, texts), naming the first row without an id or a text."""
    r = fields.retrieval
    ids, texts = [], []
    for number, row in enumerate(corpus, start=1):
        doc_id, text = field_value(row, r.id_field), field_value(row, r.text_field)
        if doc_id is None or not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{r.corpus_path} row {number}: needs an id in '{r.id_field}' and text in '{r.text_field}' "
                f"(data.retrieval.id_field / text_field). Fields present: {sorted(row)}."
            )
        ids.append(str(doc_id))
        texts.append(unicodedata.normalize("NFKC", text) if fields.nfkc else text)
    return ids, texts


def class_labels(train: list[dict], evaluation: list[dict], fields: DataParams) -> list[str]:
    """The valid labels: data.labels, else the distinct first answers of the training split; an eval
    gold outside them is named (it could never be predicted)."""
    labels = fields.label_names or sorted({e["answers"][0] for e in train})
    unknown = sorted({e["answers"][0] for e in train + evaluation} - set(labels))
    if unknown:
        where = "data.labels" if fields.labels else "the training split's labels"
        raise DataError(f"Gold label(s) {unknown[:5]} are not among {where} {labels}.")
    return labels


def user_message(example: dict, prompt: PromptParams, labels: list[str] = ()) -> str:
    passages = "\n\n".join(f"[{i}] {p.strip()}" for i, p in enumerate(example["passages"], start=1))
    return prompt.template.format(instruction=prompt.instruction, passages=passages, question=example["question"], labels=", ".join(labels))


def chat_prompt(example: dict, prompt: PromptParams, labels: list[str] = ()) -> list[dict]:
    """The prompt messages: prompt.system (unless the turns bring their own), then a chat row's context turns verbatim,
    or the user message prompt.template renders."""
    turns = example.get("context") or [{"role": "user", "content": user_message(example, prompt, labels)}]
    own_system = turns[0]["role"] == "system"
    return ([{"role": "system", "content": prompt.system}] if prompt.system and not own_system else []) + turns


def with_chat(example: dict, prompt: PromptParams, labels: list[str] = ()) -> dict:
    """The example plus its prompt/completion messages (TRL's conversational prompt-completion format); a chat row's
    context turns are its prompt, kept there only."""
    return {
        **{k: v for k, v in example.items() if k != "context"},
        "prompt": chat_prompt(example, prompt, labels),
        "completion": [{"role": "assistant", "content": example.get("target", example["answers"][0])}],
    }


def sampled_texts(p: Params, train: list[dict], evaluation: list[dict]) -> list[tuple[str, str]]:
    """The texts of a sample of each split's rows as 01 renders them (system prompt, user message, answer), for the
    tokenizer's round-trip check."""
    return [t for name, rows in (("train", train), ("eval", evaluation)) for t in row_texts([with_chat(e, p.prompt, p.data.label_names) for e in rows], name)]


def count_tokens(examples: list[dict], tokenizer, fmt) -> list[int]:
    """Each example's length as 02 trains it (families.training_tokens: this also runs the template checks in 01, so a
    template that would teach template text or never stop is refused before anything is trained)."""
    return [sum(map(len, training_tokens(tokenizer, fmt, e["prompt"], e["completion"]))) for e in examples]


@dataclass
class BuiltDataset:
    train: list[dict]
    eval: list[dict]
    summary: DatasetOutputs  # what 01 recorded
    dataset_dir: Path

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.summary.table).set_index("split")

    def cleaning_table(self):
        """Made by a teacher: pairs (rows) kept and removed by each cleaning step, in order."""
        import pandas as pd

        return pd.DataFrame(self.summary.synthetic["steps"]).set_index("step")

    def teacher_table(self):
        """Made by a teacher: chunks asked about (rows asked for, synthesize.labelled), replies that failed or held no
        pairs, and the teacher's tally."""
        import pandas as pd

        s = self.summary.synthetic
        if s.get("kind") == "labelled":  # rows written for labels (synthesize.labelled)
            counts = {"rows asked for": s["requests"], "requests failed": s["failed_requests"], "replies without a row": s["unparsed_replies"]}
            return pd.Series({**counts, **s["teacher"]}, name="teacher").to_frame()
        counts = {
            "chunks": s["chunks"],
            "chunks asked": s["chunks_asked"],
            "requests failed": s["failed_chunks"],
            "replies without pairs": s["unparsed_chunks"],
        }
        return pd.Series({**counts, **s["teacher"]}, name="teacher").to_frame()


def _splits(p: Params, examples: list[dict], evaluation: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, relabel counts): data.eval_path's rows, or data.eval_size held out of the training rows (split by
    group). Marks from 05 name eval examples: they apply to the rows the eval split is drawn from."""
    relabeled = {}
    if p.data.eval_path:
        if p.data.relabels_path:
            evaluation, relabeled = apply_relabels(evaluation, Path(p.data.relabels_path))
        return examples, evaluation, relabeled
    if p.data.relabels_path:
        examples, relabeled = apply_relabels(examples, Path(p.data.relabels_path))
    train, evaluation = split_examples(examples, p.data.eval_size, p.seed)
    return train, evaluation, relabeled


def _labelled_splits(p: Params) -> tuple[list[dict], list[dict], dict, dict]:
    """Labelled rows (data.train_path, data.eval_path) read, validated and split, and checked for eval rows that repeat
    training rows: (train, eval, relabel counts, overlap record)."""
    d = p.data
    raw_eval = read_rows(d.eval_path, d.eval_split) if d.eval_path else []
    evaluation = to_examples(raw_eval, d, d.eval_path, d.nfkc) if d.eval_path else []
    raw_train = read_rows(d.train_path, d.train_split)
    examples = to_examples(raw_train, d, d.train_path, d.nfkc)
    fmt = data_format(p, raw_train, raw_eval)
    if d.format == "auto":
        print(f"data.format auto: {d.train_path} holds {fmt} rows (from its first row's keys)")
    train, evaluation, relabeled = _splits(p, examples, evaluation)
    # Ids compare the two files only when every row has its own (else some are row numbers, which any two files share);
    # in a split of one file they are unique already (to_examples refuses a duplicate).
    real_ids = bool(d.eval_path and d.id_field) and all(r.get(d.id_field) not in (None, "") for r in raw_train + raw_eval)
    return train, evaluation, relabeled, check_eval_overlap(train, evaluation, p, real_ids)


def build_dataset(run: Run) -> BuiltDataset:
    """Stage 01 end to end: read, validate, split, cap, retrieve, render, count tokens, save (datasets + JSONL)."""
    from tunebook.models.load import load_tokenizer

    p = run.params
    # Labelled rows are read, validated and split before the stage starts: an eval split that repeats training rows
    # (EvalOverlapError) stops here and leaves the run folder as it was, with nothing marked failed or stale. Other bad
    # input is raised inside the stage, which records the failure.
    labelled, bad_input, tokenizer = None, None, None
    if p.data.train_path:
        try:
            labelled = _labelled_splits(p)
        except EvalOverlapError:
            raise
        except DataError as e:
            bad_input = e
    if bad_input is None:
        try:
            tokenizer = load_tokenizer(p.model.name, p.model.chat_template, p.model.enable_thinking)
        except TunebookError as e:
            bad_input = e
    if labelled and tokenizer:
        # A tokenizer that does not give the rows' text back stops here too, with the run folder as it was.
        check_round_trip(tokenizer, sampled_texts(p, labelled[0], labelled[1]), p.model.name)
    prepare_stage(p, "01_build_dataset")
    with run.stage("01_build_dataset") as outputs:
        if bad_input:
            raise bad_input
        final = run.dir / "dataset"
        tmp = fresh_tmp_dir(final)  # written whole, then swapped in: a failed build leaves the last dataset as it was
        fmt = chat_format(tokenizer, enable_thinking=p.model.enable_thinking)
        print(
            f"Chat format: {fmt.family}; answers end with {fmt.end_of_turn!r}"
            + (f"; thinking {'on' if fmt.enable_thinking else 'off'}" if fmt.thinking_switch else "")
        )
        if p.synthesize.documents_path:
            fields, synthetic, (train, evaluation, relabeled, overlap) = _rows_from_documents(p, tokenizer, tmp)
            synthetic = _synthetic_record(p, synthetic, final)
        elif p.synthesize.labelled.examples_per_label:
            fields, (synthetic, (train, evaluation, relabeled, overlap)) = p.data, _rows_from_teacher(p, labelled, tmp, final)
        else:
            fields, synthetic, (train, evaluation, relabeled, overlap) = p.data, None, labelled
        # Labels from the whole training split, so that a cap below cannot drop a class.
        labels = class_labels(train, evaluation, p.data) if p.evaluate.metric == "classification" else []
        train, evaluation = _capped(p, train, evaluation)
        train, evaluation = _retrieved(train, evaluation, fields)
        if synthetic or fields.retrieval.corpus_path:  # text the rows did not hold: the teacher's, the corpus's
            check_round_trip(tokenizer, sampled_texts(p, train, evaluation), p.model.name)
        splits, table, gold_missing = _rendered(p, {"train": train, "eval": evaluation}, labels, tokenizer, fmt, fields, final)
        _save(splits, tmp, final)
        recorded = DatasetOutputs(
            dataset_dir=str(final / "hf"),
            train_jsonl=str(final / "train.jsonl"),
            eval_jsonl=str(final / "eval.jsonl"),
            table=table,
            labels=labels,
            lengths={k: [e["n_tokens"] for e in v] for k, v in splits.items()},
            relabeled=relabeled,
            eval_overlap=overlap,
            gold_missing=gold_missing,
            synthetic=synthetic,
        )
        outputs.update(recorded.as_json())
    return BuiltDataset(train=splits["train"], eval=splits["eval"], summary=recorded, dataset_dir=final)


def _synthetic_record(p: Params, synthetic, final: Path) -> dict:
    """What 01 records of a teacher-written dataset: its chunks, cleaning steps, failures and files."""
    return {
        "documents_path": p.synthesize.documents_path,
        "chunks": len(synthetic.chunks),
        "chunks_asked": synthetic.asked,
        "steps": synthetic.steps,
        "teacher": synthetic.teacher,
        "failed_chunks": synthetic.failed_chunks,
        "unparsed_chunks": synthetic.unparsed_chunks,
        "pairs_jsonl": str(final / "synthetic_pairs.jsonl"),
        "chunks_jsonl": str(final / "chunks.jsonl"),
    }


def _rows_from_documents(p: Params, tokenizer, tmp: Path):
    """The teacher's rows from synthesize.documents_path (its chunks and pairs written beside the dataset), split and
    checked against the eval rows: (fields, synthetic, (train, eval, relabeled, overlap))."""
    fields = document_fields(p.data, tmp / "chunks.jsonl")
    # Eval rows first: a teacher's questions are decontaminated against them.
    raw_eval = read_rows(p.data.eval_path, p.data.eval_split) if p.data.eval_path else []
    evaluation = to_examples(raw_eval, fields, p.data.eval_path, p.data.nfkc) if p.data.eval_path else []
    data_format(p, [], raw_eval)
    synthetic = synthesize(p, tokenizer, [e["question"] for e in evaluation])
    write_jsonl(tmp / "chunks.jsonl", [{**c, "passage": passage(c)} for c in synthetic.chunks])
    write_jsonl(tmp / "synthetic_pairs.jsonl", synthetic.pairs)
    train, evaluation, relabeled = _splits(p, synthetic.examples, evaluation)
    overlap = check_eval_overlap(train, evaluation, p, real_ids=False)  # the teacher's rows have ids of our making
    return fields, synthetic, (train, evaluation, relabeled, overlap)


def _rows_from_teacher(p: Params, labelled, tmp: Path, final: Path):
    """Rows a teacher wrote for data.labels (synthesize.labelled), real training rows mixed in as asked, and the real
    eval rows (data.train_path's split, or data.eval_path): (what 01 records of them, (train, eval, relabeled, overlap))."""
    from tunebook.dataset.labelled import write_labelled_rows

    if labelled:
        real_train, evaluation, relabeled, _ = labelled
    else:
        raw_eval = read_rows(p.data.eval_path, p.data.eval_split)
        real_train, evaluation, relabeled = _splits(p, [], to_examples(raw_eval, p.data, p.data.eval_path, p.data.nfkc))
    if any("context" in e for e in real_train + evaluation):
        raise DataError(
            "synthesize.labelled writes question/passages rows (data.question_field, data.passages_field), and the real rows are "
            "conversations (data.format): evaluate on question/passages rows, or write the labelled rows yourself"
        )
    written = write_labelled_rows(p, real_train, evaluation, tmp / "teacher_rows.jsonl", final / "teacher_rows.jsonl")
    overlap = check_eval_overlap(written.examples, evaluation, p, real_ids=False)  # the teacher's rows have ids of our making
    return written.record, (written.examples, evaluation, relabeled, overlap)


def _capped(p: Params, train: list[dict], evaluation: list[dict]) -> tuple[list[dict], list[dict]]:
    """Shuffled (seeded) before any cap, so a capped split still spans every topic and source; then RAFT's oracle and
    distractor passages."""
    random.Random(p.seed).shuffle(train)
    random.Random(p.seed + 1).shuffle(evaluation)
    train = train[: p.data.max_train_examples]
    evaluation = evaluation[: p.data.max_eval_examples]
    if p.data.raft.enabled:
        rng = random.Random(p.seed)
        prefix = p.prompt.final_answer_prefix
        train = [raft_example(e, p.data.raft, rng, train=True, answer_prefix=prefix) for e in train]
        # Real eval questions asked of documents have no oracle: their passages are retrieved below.
        evaluation = [raft_example(e, p.data.raft, rng, train=False, answer_prefix=prefix) if "oracle_titles" in e else e for e in evaluation]
    for name, rows in (("train", train), ("eval", evaluation)):
        if not rows:
            raise DataError(f"The {name} split is empty: check data.eval_size={p.data.eval_size} and data.eval_path.")
    return train, evaluation


def _retrieved(train: list[dict], evaluation: list[dict], fields: DataParams) -> tuple[list[dict], list[dict]]:
    """Passages retrieved from the corpus for the rows that have none (one index for both splits: read once)."""
    rows = train + evaluation
    unretrieved = [i for i, e in enumerate(rows) if not e["passages"]]
    if not (fields.retrieval.corpus_path and unretrieved):
        return train, evaluation
    for i, e in zip(unretrieved, retrieve_passages([rows[i] for i in unretrieved], fields)):
        rows[i] = e
    return rows[: len(train)], rows[len(train) :]


def _rendered(p: Params, splits: dict[str, list[dict]], labels: list[str], tokenizer, fmt, fields: DataParams, final: Path):
    """Each split as chat prompts and answers, their token counts (too long for model.max_seq_length: dropped and
    counted), and whether each gold answer is in its passages: (splits, table, gold_missing or None)."""
    rendered, table, gold_missing = {}, [], {}
    # A class label or a long FAQ answer is not expected in the passages; a chat row's answer has no passages.
    spans = p.evaluate.metric in SPAN_METRICS and any(e["passages"] for rows in splits.values() for e in rows)
    for name, rows in splits.items():
        rows = [with_chat(e, p.prompt, labels) for e in rows]
        lengths = count_tokens(rows, tokenizer, fmt)
        kept = [dict(e, n_tokens=n) for e, n in zip(rows, lengths) if n <= p.model.max_seq_length]
        found = [answer_in_passages(e["passages"], e["answers"]) for e in kept]
        golds_in_passages = sum(f is True for f in found)
        if spans:
            for e, f in zip(kept, found):
                e["gold_in_passages"] = f
            gold_missing[name] = _warn_gold_missing(name, kept, p, fields, final)
        retrieval_hits = {"gold_doc_retrieved": sum(e["gold_retrieved"] for e in kept)} if kept and "gold_retrieved" in kept[0] else {}
        if not kept:
            raise DataError(
                f"The {name} split is empty after dropping examples longer than model.max_seq_length="
                f"{p.model.max_seq_length} tokens ({len(rows)} before). Raise max_seq_length or use shorter passages."
            )
        rendered[name] = kept
        table.append(
            {
                "split": name,
                "examples": len(kept),
                "dropped_too_long": len(rows) - len(kept),
                "gold_in_passages": golds_in_passages,
                **retrieval_hits,
                "tokens_median": sorted(lengths)[len(lengths) // 2],
                "tokens_max": max(lengths),
            }
        )
    return rendered, table, gold_missing if spans else None


def _save(splits: dict[str, list[dict]], tmp: Path, final: Path) -> None:
    """The splits as a datasets DatasetDict (02 trains from it) and as JSONL (04, 05 and people read them)."""
    from datasets import Dataset, DatasetDict

    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(tmp / "hf"))
    for name, rows in splits.items():
        write_jsonl(tmp / f"{name}.jsonl", rows)
    replace_dir(tmp, final)


def _warn_gold_missing(split: str, rows: list[dict], p: Params, fields: DataParams, final: Path) -> dict:
    """Count (and warn about) the rows none of whose gold answers is in their passages; a RAFT training row whose oracle
    passages were dropped on purpose (data.raft.oracle_drop) is left out. What 01 records under gold_missing."""
    dropped = sum(e.get("oracle_kept") is False for e in rows)
    missing = [e for e in rows if e["gold_in_passages"] is False and e.get("oracle_kept") is not False]
    of = len(rows) - dropped
    record = {"rows": len(missing), "of": of, "share": round(len(missing) / of, 4) if of else 0.0, "ids": [e["id"] for e in missing[:20]]}
    if missing:
        noun, effect = (
            ("training", "so the model is taught to answer without evidence")
            if split == "train"
            else ("eval", "so no model can read their answers there (05 flags them 'retrieval miss')")
        )
        if fields.retrieval.corpus_path:
            cause = f"Retrieval (data.retrieval, top_k {fields.retrieval.top_k}) did not bring a passage that holds them."
        else:
            cut = f", and data.passage_max_chars ({p.data.passage_max_chars}), which cuts passages" if p.data.passage_max_chars else ""
            cause = f"Check data.answers_field ('{p.data.answers_field}') and data.passages_field ('{p.data.passages_field}'){cut}."
        aside = f" (not counting {dropped} RAFT rows whose oracle passages were dropped on purpose)" if dropped else ""
        print(
            f"Warning: {len(missing)} of {of} {noun} rows ({record['share']:.1%}) have no gold answer in their passages{aside} "
            f"(case, width, punctuation and spacing ignored), {effect}. {cause} "
            f"They carry gold_in_passages: false in {final / (split + '.jsonl')}."
        )
    return record


RELABEL_MARKS = ("also_acceptable", "gold_wrong")


def read_relabels(path: Path) -> list[dict]:
    """05's marks, naming the first one that is not {id, prediction, mark}."""
    marks = read_jsonl(path)
    for number, m in enumerate(marks, start=1):
        if m.get("mark") not in RELABEL_MARKS or not isinstance(m.get("id"), str) or not isinstance(m.get("prediction"), str):
            raise DataError(f"{path} mark {number}: expected id, prediction and mark ({' or '.join(RELABEL_MARKS)}), got {m}.")
    return marks


def apply_relabels(examples: list[dict], path: Path) -> tuple[list[dict], dict[str, int]]:
    """The marks of 05's answer browser applied by example id: "also_acceptable" adds the marked prediction to the
    gold answers, "gold_wrong" drops the example (its gold cannot be trusted). Marks for other ids are counted."""
    marks = read_relabels(path)
    ids = {e["id"] for e in examples}
    dropped = {m["id"] for m in marks if m["mark"] == "gold_wrong"} & ids
    added = 0
    for e in examples:
        for m in marks:
            if m["id"] == e["id"] and m["mark"] == "also_acceptable" and m["prediction"].strip() and m["prediction"].strip() not in e["answers"]:
                e["answers"].append(m["prediction"].strip())
                added += 1
    counts = {"answers_added": added, "examples_dropped": len(dropped), "marks_for_other_ids": sum(m["id"] not in ids for m in marks)}
    print(f"Relabels from {path}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    return [e for e in examples if e["id"] not in dropped], counts


def load_split(run: Run, split: str) -> list[dict]:
    recorded = run.outputs_of("01_build_dataset")
    return read_jsonl(Path({"train": recorded.train_jsonl, "eval": recorded.eval_jsonl}[split]))


def plot_token_lengths(built: BuiltDataset, max_seq_length: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    for name, lengths in built.summary.lengths.items():
        ax.hist(lengths, bins=30, alpha=0.6, label=f"{name} ({len(lengths)})")
    ax.axvline(max_seq_length, color="red", linestyle="--", label="max_seq_length")
    ax.set_xlabel("tokens per example (prompt + answer)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_cleaning(built: BuiltDataset):
    """The cleaning funnel: pairs left after each step."""
    import matplotlib.pyplot as plt

    steps = built.summary.synthetic["steps"]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(steps) + 1))
    ax.barh([s["step"] for s in steps][::-1], [s["kept"] for s in steps][::-1], color="tab:blue")
    for y, s in enumerate(steps[::-1]):
        ax.text(s["kept"], y, f" {s['kept']}" + (f" (-{s['removed']})" if s["removed"] else ""), va="center")
    ax.set_xlabel("rows kept" if built.summary.synthetic.get("kind") == "labelled" else "question/answer pairs kept")
    fig.tight_layout()
    return fig
