"""Training rows written by a teacher from documents (stage 01), for real: the teacher is llama-cpp-python's server with
the embedded SmolLM2 behind a fault-injecting proxy (tests/servers.py), or the embedded model run locally. A 135M
teacher writes poor pairs, so these tests check structure, bookkeeping, caching and failure handling, not quality."""

import json
from pathlib import Path

import pytest

from servers import MODEL_ALIAS, FaultProxy, free_port, serving
from tunebook.dataset.build import build_dataset, read_jsonl
from tunebook.dataset.synthetic import SynthesisError
from tunebook.params.schema import TeacherParams
from tunebook.run.folder import open_run
from tunebook.teacher import endpoint
from tunebook.teacher.client import Teacher

# Our own small documentation of a made-up package manager. Two pages carry the proxy's fault markers: the teacher's
# reply for one is not JSON (MALFORMED), the request for the other always fails (FAIL-ALWAYS).
DOCUMENTS = {
    "tidepool.md": "# Tidepool package manager\n\nTidepool is a package manager for the fictional Reef operating system. "
    "It installs, upgrades and removes software packages.\n\nTo install a package, run `tide add NAME`. Tidepool "
    "downloads the package from the nearest mirror and checks its signature before unpacking it.\n\nTo remove a "
    "package, run `tide drop NAME`. Configuration files are kept unless you add the `--purge` flag.\n",
    "mirrors.txt": "Choosing a mirror\n\nReef mirrors are listed in the file /etc/tide/mirrors. Tidepool tries them in order and "
    "uses the first one that answers within five seconds.\n\nA mirror that serves a package with a bad signature is "
    "skipped for one hour. You can test a mirror with the command tide ping URL.\n",
    "releases.html": "<html><head><title>Reef release cycle</title><style>p{}</style></head><body><h1>Reef release cycle</h1>"
    "<p>Reef publishes a new stable release every nine months. Each stable release receives security updates for "
    "three years.</p><p>The testing branch receives new packages every day. Upgrading from one stable release to "
    "the next is done with the command tide leap.</p></body></html>\n",
    "faults.txt": "Known problems\n\nMALFORMED This page describes known problems with the Reef installer on machines with very old graphics cards.\n",
    "errors.txt": "Error codes\n\nFAIL-ALWAYS Error code 42 means that the package database is locked by another Tidepool process.\n",
}
EVAL = [
    {"id": "tidepool.md", "question": "How do I install a package with Tidepool?", "answers": ["Run tide add NAME."]},
    {
        "id": "mirrors.txt",
        "question": "How does Tidepool choose a mirror?",
        "answers": ["It uses the first mirror in /etc/tide/mirrors that answers within five seconds."],
    },
    {"id": "releases.html", "question": "How often is a stable Reef release published?", "answers": ["Every nine months."]},
]


@pytest.fixture
def documents(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    with open(tmp_path / "eval.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in EVAL)
    return folder


@pytest.fixture
def proxy(llama_server):
    with serving(FaultProxy(llama_server, slow_seconds=0)) as p:
        yield p


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(endpoint, "WAIT_INITIAL", 0.01)
    monkeypatch.setattr(endpoint, "WAIT_MAX", 0.05)


def test_teacher_caches_replies_counts_them_and_never_caches_a_failure(proxy, tmp_path):
    params = TeacherParams(
        model=MODEL_ALIAS,
        base_url=proxy.base_url,
        max_new_tokens=16,
        max_retries=1,
        cache_dir=str(tmp_path / "cache"),
        price_per_million_input=2.0,
        price_per_million_output=8.0,
    )
    prompts = [[{"role": "user", "content": text}] for text in ("Name a color. Reply in JSON.", "FAIL-ALWAYS Name a fruit.", "MALFORMED Name a tree.")]
    teacher = Teacher(params)
    first = teacher.ask(prompts)
    assert first[0].text and not first[0].cached
    assert first[1].text is None and first[1].error.startswith("InternalServerError HTTP 500")
    assert first[2].text == "Sure! Here are some questions: what, why"  # not JSON, but an answer: kept as it came
    tally = teacher.tally
    assert (tally.requests, tally.failed, tally.cache_hits) == (3, 1, 0)
    assert tally.prompt_tokens > 0 and tally.completion_tokens > 0
    assert tally.cost == pytest.approx((tally.prompt_tokens * 2.0 + tally.completion_tokens * 8.0) / 1e6)
    assert all(body["response_format"] == {"type": "json_object"} for body in proxy.bodies)
    assert len(proxy.bodies) == 4  # the failing prompt was tried twice (max_retries=1)

    again = Teacher(params)  # a new process would see the same cache on disk
    second = again.ask(prompts)
    assert [r.text for r in second] == [r.text for r in first] and second[0].cached and second[2].cached
    assert second[1].text is None  # asked again, failed again: failures are never cached
    assert (again.tally.requests, again.tally.cache_hits) == (1, 2) and len(proxy.bodies) == 6


def faq_params(write_params, documents: Path, base_url: str, model: str = MODEL_ALIAS) -> Path:
    return write_params(f"""
run_name: docs_faq
output_dir: {documents.parent / "out"}
data:
  eval_path: {documents.parent / "eval.jsonl"}
  retrieval: {{top_k: 2, gold_id_field: id}}
synthesize:
  documents_path: {documents}
  chunk_tokens: 96
  chunk_overlap: 16
  pairs_per_chunk: 2
  teacher: {{model: {model}, base_url: "{base_url}", max_new_tokens: 200, max_retries: 1, cache_dir: {documents.parent / "cache"}}}
  # The judge runs and scores every pair; a threshold of 1 keeps what it drops out of this test, because how many of a
  # 135M teacher's greedy pairs pass depends on the CPU's llama.cpp kernels (0 of 2 with this machine's build at 4).
  clean: {{judge: true, judge_min_score: 1}}
""")


def test_faq_rows_from_documents_through_a_real_server(proxy, documents, write_params):
    run = open_run(faq_params(write_params, documents, proxy.base_url))
    built = build_dataset(run)
    s = built.summary.synthetic
    assert s["chunks"] == 5  # each page is shorter than one chunk
    assert s["failed_chunks"] == 1 and s["unparsed_chunks"] >= 1  # the FAIL-ALWAYS page, the MALFORMED page (at least)
    pairs = read_jsonl(Path(s["pairs_jsonl"]))
    steps = s["steps"]
    assert steps[0] == {"step": "parsed from the teacher's replies", "kept": len(pairs), "removed": 0}
    assert [r["step"] for r in steps[1:]] == [
        "self-contained question",
        "length",
        "exact duplicate",
        "near duplicate",
        "shares an n-gram with an eval question",
        "judge score below 1",
    ]
    for before, after in zip(steps, steps[1:]):
        assert after["kept"] == before["kept"] - after["removed"]
        assert after["removed"] == sum(p["dropped_by"] == after["step"] for p in pairs)
    kept = [p for p in pairs if p["dropped_by"] is None]
    assert len(kept) == steps[-1]["kept"] >= 1
    assert all("judge_score" in p for p in pairs if p["dropped_by"] in (None, "judge score below 1"))
    # Training rows: the kept pairs, each with the chunk BM25 retrieves for its question; eval rows: the real questions.
    assert [e["question"] for e in built.train] == [p["question"] for p in kept]
    assert all(e["completion"][0]["content"] == p["answer"] for e, p in zip(built.train, kept))
    assert all(e["passages"] and e["gold_doc"] in DOCUMENTS for e in built.train)
    assert sorted(e["question"] for e in built.eval) == sorted(r["question"] for r in EVAL)
    assert all(len(e["passages"]) == 2 and "gold_retrieved" in e for e in built.eval)
    chunks = read_jsonl(Path(s["chunks_jsonl"]))
    assert {c["doc_id"] for c in chunks} == set(DOCUMENTS) and all(c["passage"].endswith(c["text"]) for c in chunks)
    assert s["teacher"]["requests"] == 5 + steps[-2]["kept"]  # a request per chunk, and one per pair the judge saw
    # What notebook 01 shows.
    assert list(built.cleaning_table()["kept"]) == [r["kept"] for r in steps]
    shown = built.teacher_table()["teacher"]
    assert (shown["chunks asked"], shown["requests failed"], shown["requests"]) == (5, 1, s["teacher"]["requests"])

    # A rerun pays only for what failed: every reply that came back is in the cache.
    sent = len(proxy.bodies)
    rebuilt = build_dataset(run)
    r = rebuilt.summary.synthetic["teacher"]
    assert r["requests"] == 1 and r["failed"] == 1 and len(proxy.bodies) == sent + 2  # the failing chunk, tried twice
    assert r["cache_hits"] == 4 + steps[-2]["kept"]  # 4 chunks, and the judge's replies
    assert rebuilt.train == built.train

    # A teacher that answers nothing stops 01 with one message, and the last dataset stays as it was.
    before = (run.dir / "dataset" / "train.jsonl").read_text()
    dead = open_run(faq_params(write_params, documents, f"http://127.0.0.1:{free_port()}/v1", model="another-model"))
    with pytest.raises(SynthesisError, match=r"The teacher gave no usable pairs for 5 chunks: 5 requests failed"):
        build_dataset(dead)
    assert (run.dir / "dataset" / "train.jsonl").read_text() == before
    assert dead.status("01_build_dataset") == "failed"


def test_raft_rows_from_documents_with_a_local_teacher(documents, write_params):
    """The embedded model as a local transformers teacher (its JSON reply opened for it), RAFT rows with the
    embedding-nearest chunks of other documents as distractors; eval rows held out from the generated ones."""
    run = open_run(
        write_params(f"""
run_name: docs_raft
output_dir: {documents.parent / "out"}
data:
  eval_size: 1
  raft: {{enabled: true, distractors: 2, oracle_drop: 0.5}}
prompt:
  final_answer_prefix: "Answer:"
synthesize:
  documents_path: {documents}
  chunk_tokens: 96
  chunk_overlap: 16
  pairs_per_chunk: 2
  distractor_choice: nearest
  teacher: {{max_new_tokens: 160, cache_dir: {documents.parent / "cache"}}}
""")
    )
    built = build_dataset(run)
    s = built.summary.synthetic
    assert s["failed_chunks"] == 0 and s["teacher"]["requests"] == 5 and s["teacher"]["completion_tokens"] > 0
    assert "supporting sentence found in the chunk" in [r["step"] for r in s["steps"]]
    chunks = {c["id"]: c for c in read_jsonl(Path(s["chunks_jsonl"]))}
    pairs = {p["question"]: p for p in read_jsonl(Path(s["pairs_jsonl"])) if p["dropped_by"] is None}
    rows = [(e, False) for e in built.train] + [(e, True) for e in built.eval]
    assert len(rows) == len(pairs) >= 2
    for e, is_eval in rows:
        pair = pairs[e["question"]]
        oracle = chunks[pair["chunk"]]
        quote = pair["quote"]
        assert quote in " ".join(oracle["text"].split())  # a sentence of its own chunk
        target = e["completion"][0]["content"]
        assert target.startswith(f"The passages say: ##begin_quote## {quote} ##end_quote##")
        assert target.endswith(f"\nAnswer: {pair['answer']}")
        others = [p for p in e["passages"] if p != oracle["passage"]]
        assert len(others) == 2 and all(not p.startswith(oracle["title"] + ":") for p in others)  # other documents' chunks
        assert (oracle["passage"] in e["passages"]) == e["oracle_kept"]
        assert e["oracle_kept"] or not is_eval  # eval rows always keep their oracle
