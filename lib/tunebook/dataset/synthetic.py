"""Stage 01 from documents: a teacher LLM writes question/answer pairs per chunk; the pairs are cleaned, then become
training rows (FAQ rows, or RAFT rows with the oracle chunk among distractors and a quoting, reasoning target).

Cleaning, each step counted: questions that lean on "the passage", length, a supporting quote found in the chunk (RAFT),
language, exact duplicates, near duplicates (MinHash over character 5-grams, datasketch), contamination by the eval
split (shared n-grams of words; of characters for scripts written without spaces), and an optional judge pass.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass

from tunebook.errors import TunebookError
from tunebook.params.schema import CleanParams, Params

# One unit per CJK character (Japanese and Chinese are written without spaces), else one per word.
_UNITS = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|[^\W\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]+")


def normalize(text: str) -> str:
    """NFKC and casefold, every run of non-word characters one space: what two copies of a text still share."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


def exact_duplicates(texts: list[str]) -> list[int]:
    """Indices of texts equal to an earlier one once normalized (the first copy is kept)."""
    seen, dropped = set(), []
    for i, text in enumerate(texts):
        key = normalize(text)
        (dropped.append(i) if key in seen else seen.add(key))
    return dropped


def near_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 128) -> list[int]:
    """Indices of texts whose character 5-grams overlap an earlier kept text's by Jaccard >= threshold (MinHash
    estimates, candidates from LSH); the first of each group is kept."""
    from datasketch import MinHash, MinHashLSH

    lsh, kept, dropped = MinHashLSH(threshold=threshold, num_perm=num_perm), {}, []
    for i, text in enumerate(texts):
        key = normalize(text)
        grams = {key[j : j + 5] for j in range(max(1, len(key) - 4))}
        signature = MinHash(num_perm=num_perm, seed=1)
        signature.update_batch(g.encode("utf-8") for g in grams)
        # LSH candidates are probable matches: each is checked against the threshold before a text is dropped.
        if any(kept[k].jaccard(signature) >= threshold for k in lsh.query(signature)):
            dropped.append(i)
        else:
            kept[str(i)] = signature
            lsh.insert(str(i), signature)
    return dropped


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    units = _UNITS.findall(unicodedata.normalize("NFKC", text).casefold())
    return {tuple(units[i : i + n]) for i in range(len(units) - n + 1)}


def contaminated(texts: list[str], references: list[str], n: int = 8) -> list[int]:
    """Indices of texts that share an n-gram (n words, or n characters of Japanese/Chinese) with any reference text,
    e.g. generated questions against the eval split's questions and answers."""
    banned = set().union(*(ngrams(r, n) for r in references)) if references else set()
    return [i for i, text in enumerate(texts) if ngrams(text, n) & banned]


FAQ_PROMPT = """Write {n} questions that a user of this documentation could ask and that the excerpt below answers, each with its answer. Reply with JSON only, in this form: {{"pairs": [{{"question": "...", "answer": "..."}}]}}
Each question must name what it asks about, so that it makes sense to someone who has not seen the excerpt: never write "the text", "the passage", "the excerpt", "this document" or "according to". Each answer is one to three sentences, true to the excerpt.

Excerpt from "{title}":
{text}"""

RAFT_PROMPT = """Write {n} questions that a user of this documentation could ask and that the excerpt below answers. For each, copy the sentence of the excerpt that answers it word for word as the quote, explain in one sentence how the quote answers the question, and give the answer. Reply with JSON only, in this form: {{"pairs": [{{"question": "...", "quote": "...", "reasoning": "...", "answer": "..."}}]}}
Each question must name what it asks about, so that it makes sense to someone who has not seen the excerpt: never write "the text", "the passage", "the excerpt", "this document" or "according to".

Excerpt from "{title}":
{text}"""

JUDGE_PROMPT = """Rate this question-and-answer pair, written from the documentation excerpt below, from 1 (unusable) to 5 (excellent). A 5 is a question a real user would ask, that names its subject and makes sense on its own, with an answer that the excerpt supports and that answers the question completely. Reply with JSON only: {{"score": <1 to 5>, "reason": "<one sentence>"}}

Excerpt:
{text}

Question: {question}
Answer: {answer}"""

PAIRS_START = '{"pairs": [{"question": "'  # a local teacher's reply starts here (json_mode)
JUDGE_START = '{"score": '

# Questions that only make sense next to their chunk (the FAQ-model write-up's "according to the passage" problem).
LEANS_ON_CHUNK = re.compile(
    r"\b(the|this|that|above|given|following|provided)\s+(text|passage|excerpt|document|context|article|paragraph|section|documentation)\b"
    r"|\baccording to (the|this)\b",
    re.IGNORECASE,
)


class SynthesisError(TunebookError):
    pass


def parse_pairs(reply: str, optional: tuple[str, ...] = ()) -> list[dict] | None:
    """The question/answer pairs in a teacher's reply, parsed tolerantly (code fences, a cut-off reply, a bare object or
    list are all repaired by json_repair), with any `optional` text fields they have; items without a question and an
    answer are left out. None: nothing JSON-like was found."""
    import json_repair

    text = re.sub(r"^```(?:json)?|```$", "", reply.strip(), flags=re.MULTILINE).strip()
    data = json_repair.loads(text) if text else ""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v]
        data = lists[0] if lists else [data]
    if not isinstance(data, list):
        return None
    pairs = []
    for item in data:
        if isinstance(item, dict) and all(isinstance(item.get(f), str) and item[f].strip() for f in ("question", "answer")):
            fields = [f for f in ("question", "answer", *optional) if isinstance(item.get(f), str) and item[f].strip()]
            pairs.append({f: " ".join(item[f].split()) for f in fields})
    return pairs


def parse_score(reply: str) -> int | None:
    import json_repair

    data = json_repair.loads(reply.strip()) if reply.strip() else None
    score = data.get("score") if isinstance(data, dict) else None
    try:
        return int(score) if 1 <= float(score) <= 5 else None
    except (TypeError, ValueError):
        return None


def supporting_sentence(quote: str | None, answer: str, chunk: str) -> str | None:
    """The chunk's sentence that supports an answer: the teacher's quote as the chunk has it (verbatim, whitespace
    aside, or its best fuzzy match, rapidfuzz ratio >= 85), else the sentence that shares most of the answer's words
    (token set ratio >= 60); None when no sentence does. Small teachers often leave the quote out or misquote it."""
    from rapidfuzz import fuzz, process

    if quote and quote in " ".join(chunk.split()):
        return quote
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?。])\s+|\n\s*\n", chunk) if s.strip()]
    best = process.extractOne(quote, sentences, scorer=fuzz.ratio, score_cutoff=85) if quote else None
    best = best or process.extractOne(answer, sentences, scorer=fuzz.token_set_ratio, score_cutoff=60)
    return best[0] if best else None


def language_of(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


def pick_chunks(chunks: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` chunks, evenly spread over the list (so over every document), in order."""
    if not limit or limit >= len(chunks):
        return chunks
    return [chunks[i * len(chunks) // limit] for i in range(limit)]


def passage(chunk: dict) -> str:
    return f"{chunk['title']}: {chunk['text']}" if chunk["title"] else chunk["text"]


@dataclass
class Synthesized:
    examples: list[dict]  # training rows in 01's example format
    chunks: list[dict]
    asked: int  # chunks the teacher was asked about
    pairs: list[dict]  # every parsed pair, with the step that dropped it (dropped_by) or None
    steps: list[dict]  # the cleaning funnel: step, kept, removed
    teacher: dict  # the tally: requests, cache hits, failures, tokens, seconds, cost
    failed_chunks: int
    unparsed_chunks: int


def synthesize(params: Params, tokenizer, eval_questions: list[str]) -> Synthesized:
    """Documents -> chunks -> teacher pairs -> cleaned pairs -> training rows (see the module docstring)."""
    from tunebook.dataset.documents import chunk_documents, read_documents
    from tunebook.teacher.client import Teacher

    s, raft = params.synthesize, params.data.raft.enabled
    documents = read_documents(s.documents_path, id_field=s.id_field, text_field=s.text_field, title_field=s.title_field)
    chunks = chunk_documents(documents, tokenizer, chunk_tokens=s.chunk_tokens, overlap=s.chunk_overlap)
    asked = pick_chunks(chunks, s.max_chunks)
    print(f"{len(documents)} documents, {len(chunks)} chunks of at most {s.chunk_tokens} tokens; asking the teacher about {len(asked)}", flush=True)
    teacher = Teacher(s.teacher)
    pairs, failed, unparsed = ask_for_pairs(teacher, asked, s.pairs_per_chunk, raft)
    steps = clean_pairs(pairs, {c["id"]: c for c in chunks}, s.clean, raft, eval_questions, teacher)
    kept = [p for p in pairs if p["dropped_by"] is None]
    if not kept:
        raise SynthesisError(f"Cleaning removed all {len(pairs)} generated pairs: " + "; ".join(f"{r['step']} -{r['removed']}" for r in steps[1:]))
    examples = raft_rows(kept, chunks, params, random.Random(params.seed)) if raft else faq_rows(kept)
    print("Cleaning: " + " → ".join(f"{r['kept']}" for r in steps) + f" pairs kept ({len(kept)} rows)")
    return Synthesized(examples, chunks, len(asked), pairs, steps, teacher.tally.summary(), failed, unparsed)


def ask_for_pairs(teacher, asked: list[dict], pairs_per_chunk: int, raft: bool) -> tuple[list[dict], int, int]:
    """The teacher's question/answer pairs for each chunk asked (with a supporting quote and reasoning for RAFT):
    (pairs, failed requests, replies without pairs); none at all is an error naming why."""
    template, optional = (RAFT_PROMPT, ("quote", "reasoning")) if raft else (FAQ_PROMPT, ())
    prompts = [[{"role": "user", "content": template.format(n=pairs_per_chunk, title=c["title"] or c["doc_id"], text=c["text"])}] for c in asked]
    replies = teacher.ask(prompts, json_start=PAIRS_START, desc="teacher pairs")
    pairs, failed, unparsed = [], 0, 0
    for chunk, reply in zip(asked, replies):
        if reply.text is None:
            failed += 1
            continue
        found = parse_pairs(reply.text, optional)
        if not found:
            unparsed += 1
            continue
        pairs += [{**pair, "chunk": chunk["id"], "doc_id": chunk["doc_id"], "dropped_by": None} for pair in found]
    if failed:
        print(f"{failed} teacher request(s) failed (first error: {teacher.tally.errors[0]}); they are not cached, so re-running 01 asks them again.")
    if not pairs:
        raise SynthesisError(
            f"The teacher gave no usable pairs for {len(asked)} chunks: {failed} requests failed, {unparsed} replies had no "
            f"question/answer JSON. First error: {teacher.tally.errors[0] if teacher.tally.errors else 'none'}. Check synthesize.teacher."
        )
    return pairs, failed, unparsed


def clean_pairs(pairs: list[dict], by_id: dict[str, dict], c: CleanParams, raft: bool, eval_questions: list[str], teacher) -> list[dict]:
    """Each synthesize.clean filter in turn over the pairs still kept, marking a dropped pair's dropped_by with the
    filter's name; the steps with the pairs each kept and removed."""
    steps = [{"step": "parsed from the teacher's replies", "kept": len(pairs), "removed": 0}]

    def step(name: str, drop) -> None:
        alive = [p for p in pairs if p["dropped_by"] is None]
        dropped = drop(alive)
        for i in dropped:
            alive[i]["dropped_by"] = name
        steps.append({"step": name, "kept": len(alive) - len(dropped), "removed": len(dropped)})

    step("self-contained question", lambda ps: [i for i, p in enumerate(ps) if LEANS_ON_CHUNK.search(p["question"])])
    step(
        "length",
        lambda ps: [
            i
            for i, p in enumerate(ps)
            if not (c.min_question_chars <= len(p["question"]) <= c.max_question_chars and c.min_answer_chars <= len(p["answer"]) <= c.max_answer_chars)
        ],
    )
    if raft:

        def unsupported(ps):
            bad = []
            for i, p in enumerate(ps):
                p["quote"] = supporting_sentence(p.get("quote"), p["answer"], by_id[p["chunk"]]["text"])
                if p["quote"] is None:
                    bad.append(i)
            return bad

        step("supporting sentence found in the chunk", unsupported)
    if c.language:
        step(f"language {c.language}", lambda ps: [i for i, p in enumerate(ps) if language_of(p["question"] + " " + p["answer"]) != c.language])
    step("exact duplicate", lambda ps: exact_duplicates([p["question"] for p in ps]))
    step("near duplicate", lambda ps: near_duplicates([p["question"] for p in ps], threshold=c.near_duplicate_threshold))
    if eval_questions:
        step("shares an n-gram with an eval question", lambda ps: contaminated([p["question"] for p in ps], eval_questions, n=c.decontamination_ngram))
    if c.judge:

        def judged(ps):
            prompts = [
                [{"role": "user", "content": JUDGE_PROMPT.format(text=by_id[p["chunk"]]["text"], question=p["question"], answer=p["answer"])}] for p in ps
            ]
            scores = [parse_score(r.text) if r.text is not None else None for r in teacher.ask(prompts, json_start=JUDGE_START, desc="teacher judge")]
            for p, score in zip(ps, scores):
                p["judge_score"] = score
            unscored = sum(score is None for score in scores)
            if unscored:
                print(f"The judge gave no score for {unscored} pair(s); they are kept.")
            return [i for i, score in enumerate(scores) if score is not None and score < c.judge_min_score]

        step(f"judge score below {c.judge_min_score}", judged)
    return steps


def faq_rows(pairs: list[dict]) -> list[dict]:
    """FAQ rows: passages are retrieved for the question later (BM25 over the chunks), as they will be at eval."""
    return [
        {
            "id": f"synthetic-{i}",
            "question": p["question"],
            "passages": [],
            "answers": [p["answer"]],
            "group": p["doc_id"],
            "gold_doc": p["doc_id"],
            "source_chunk": p["chunk"],
        }
        for i, p in enumerate(pairs)
    ]


def raft_rows(pairs: list[dict], chunks: list[dict], params: Params, rng: random.Random) -> list[dict]:
    """RAFT rows before data.raft_example: the oracle chunk plus data.raft.distractors chunks of other documents
    (random, or nearest to the oracle by sentence embedding), the quote, and the teacher's reasoning."""
    k = params.data.raft.distractors
    by_id = {c["id"]: i for i, c in enumerate(chunks)}
    nearest = None
    if params.synthesize.distractor_choice == "nearest":
        from tunebook.metrics import embedder

        vectors = embedder().encode([c["text"] for c in chunks], normalize_embeddings=True, batch_size=32, convert_to_numpy=True)
        nearest = (vectors @ vectors.T).argsort(axis=1)[:, ::-1]
    rows = []
    for n, p in enumerate(pairs):
        oracle = by_id[p["chunk"]]
        if nearest is not None:
            others = [j for j in nearest[oracle] if chunks[j]["doc_id"] != p["doc_id"]][:k]
        else:
            pool = [j for j, c in enumerate(chunks) if c["doc_id"] != p["doc_id"]]
            others = rng.sample(pool, min(k, len(pool)))
        chosen = [oracle, *others]
        rows.append(
            {
                "id": f"synthetic-{n}",
                "question": p["question"],
                "passages": [passage(chunks[j]) for j in chosen],
                "answers": [p["answer"]],
                "group": p["doc_id"],
                "gold_doc": p["doc_id"],
                "source_chunk": p["chunk"],
                "titles": [chunks[j]["id"] for j in chosen],
                "oracle_titles": [p["chunk"]],
                "quotes": [p["quote"]],
                "reasoning": p.get("reasoning", ""),
            }
        )
    return rows
