import json
import re
from itertools import pairwise

import pytest

from tunebook.dataset.build import DataError
from tunebook.dataset.documents import chunk_documents, read_documents


def pdf_bytes(text: str, title: str) -> bytes:
    """A minimal one-page PDF: catalog, pages, a page whose content stream shows `text` in Helvetica, and /Info."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Title ({title}) >>".encode(),
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


HTML = """<html><head><title>Keeping a package back</title>
<style>body { color: red; }</style>
<script>var secret = "do not train on me";</script></head>
<body>
  <h1>Holding packages</h1>
  <p>Run apt-mark hold to keep a package at its version.</p>
  <p>Release the hold with apt-mark unhold.</p>
</body></html>"""


@pytest.fixture
def doc_folder(tmp_path):
    folder = tmp_path / "docs"
    (folder / "guides" / "network").mkdir(parents=True)
    (folder / ".cache").mkdir()
    (folder / "notes.txt").write_text("Backups run at night.\r\nThey take\u00a0an hour.   \n", encoding="utf-8")
    (folder / "guides" / "upgrade.md").write_text("Intro line\n# Upgrading a server\n\nTake a snapshot first.\n", encoding="utf-8")
    (folder / "guides" / "network" / "dns.txt").write_text("Resolvers are listed in resolv.conf.\n", encoding="utf-8")
    (folder / "hold.html").write_text(HTML, encoding="utf-8")
    (folder / "pinning.pdf").write_bytes(pdf_bytes("Hello from a PDF about apt pinning", "Apt pinning explained"))
    (folder / ".draft.txt").write_text("A hidden draft.", encoding="utf-8")
    (folder / ".cache" / "old.txt").write_text("A hidden folder's file.", encoding="utf-8")
    (folder / "diagram.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def test_folder_of_documents(doc_folder, capsys):
    docs = read_documents(doc_folder)
    by_id = {d["id"]: d for d in docs}
    assert [d["id"] for d in docs] == ["guides/network/dns.txt", "guides/upgrade.md", "hold.html", "notes.txt", "pinning.pdf"]
    assert all(d["source"] == d["id"] for d in docs)
    assert {d["id"]: d["title"] for d in docs} == {
        "guides/network/dns.txt": "dns",
        "guides/upgrade.md": "Upgrading a server",
        "hold.html": "Keeping a package back",
        "notes.txt": "notes",
        "pinning.pdf": "Apt pinning explained",
    }
    assert by_id["notes.txt"]["text"] == "Backups run at night.\nThey take an hour."
    html = by_id["hold.html"]["text"]
    assert "Run apt-mark hold to keep a package at its version.\n\nRelease the hold" in html
    assert "secret" not in html and "color" not in html
    assert "Hello from a PDF about apt pinning" in by_id["pinning.pdf"]["text"]
    assert "Skipped 1 file(s) that are not documents (.png): diagram.png" in capsys.readouterr().out


def test_single_document_file(doc_folder):
    docs = read_documents(doc_folder / "pinning.pdf")
    assert [(d["id"], d["title"]) for d in docs] == [("pinning.pdf", "Apt pinning explained")]


def test_unreadable_and_empty_documents(tmp_path, capsys):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"Cannot read PDF .*broken\.pdf: "):
        read_documents(tmp_path / "broken.pdf")
    (tmp_path / "broken.pdf").unlink()
    (tmp_path / "scan.pdf").write_bytes(pdf_bytes("", "A scan"))
    (tmp_path / "blank.txt").write_text(" \n\n", encoding="utf-8")
    (tmp_path / "kept.txt").write_text("Some text.", encoding="utf-8")
    assert [d["id"] for d in read_documents(tmp_path)] == ["kept.txt"]
    note = capsys.readouterr().out
    assert "Skipped 2 document(s) with no text: blank.txt; scan.pdf (a PDF without a text layer" in note
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8 text"):
        read_documents(tmp_path)


def test_jsonl_documents(tmp_path):
    path = tmp_path / "kb.jsonl"
    rows = [
        {"meta": {"slug": "hold"}, "body": "Hold a package with apt-mark.", "heading": "Holding"},
        {"body": "Pin a release with a preferences file."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    docs = read_documents(path, id_field="meta.slug", text_field="body", title_field="heading")
    assert docs == [
        {"id": "hold", "title": "Holding", "text": "Hold a package with apt-mark.", "source": "kb.jsonl:hold"},
        {"id": "2", "title": "", "text": "Pin a release with a preferences file.", "source": "kb.jsonl:2"},
    ]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"id": "a", "text": "ok"}, {"id": "b", "body": "wrong field"}], r"kb\.jsonl row 2: needs text in 'text'.*Fields present: \['body', 'id'\]"),
        ([{"id": "a", "text": "one"}, {"id": "a", "text": "two"}], r"kb\.jsonl row 2: duplicate id 'a'"),
    ],
)
def test_jsonl_errors(tmp_path, rows, message):
    path = tmp_path / "kb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_documents(path)


def test_path_errors(tmp_path):
    with pytest.raises(DataError, match="Documents not found: .*nowhere"):
        read_documents(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "photo.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"no documents found.*\.txt, \.md, \.html, \.htm, \.pdf"):
        read_documents(tmp_path / "empty")
    (tmp_path / "report.docx").write_bytes(b"")
    with pytest.raises(DataError, match=r"unsupported document type '\.docx'.*\.jsonl"):
        read_documents(tmp_path / "report.docx")


@pytest.fixture(scope="module")
def tokenizer():
    from tunebook.models.load import load_tokenizer

    return load_tokenizer("embedded:SmolLM2-135M-Instruct")


PLACES = ["the mirror", "the cache", "the proxy", "the build host", "the archive"]


def sentences(n: int) -> list[str]:
    return [f"Step {i} checks that {PLACES[i % len(PLACES)]} answers before the upgrade goes on." for i in range(n)]


def located(doc: str, chunks: list[dict]) -> list[tuple[int, int]]:
    """(start, end) character positions of each chunk in the document (chunk texts are unique here)."""
    return [(doc.index(c["text"]), doc.index(c["text"]) + len(c["text"])) for c in chunks]


def test_chunks_end_at_paragraphs(tokenizer):
    paragraphs = [" ".join(sentences(40)[i : i + 2]) for i in range(0, 40, 2)]
    doc = {"id": "doc", "title": "Upgrades", "source": "upgrade.md", "text": "\n\n".join(paragraphs)}
    chunks = chunk_documents([doc], tokenizer, chunk_tokens=64, overlap=8)
    assert len(chunks) > 5
    assert [c["id"] for c in chunks] == [f"doc#{n}" for n in range(len(chunks))]
    assert all(c["doc_id"] == "doc" and c["title"] == "Upgrades" and c["source"] == "upgrade.md" for c in chunks)
    assert all(0 < c["n_tokens"] <= 64 for c in chunks)
    spans = located(doc["text"], chunks)
    assert all(doc["text"][end : end + 2] == "\n\n" for _, end in spans[:-1])
    assert spans[-1][1] == len(doc["text"])


@pytest.mark.parametrize("overlap", [0, 12])
def test_chunk_overlap(tokenizer, overlap):
    text = " ".join(sentences(30))
    chunks = chunk_documents([{"id": "d", "title": "", "source": "d.txt", "text": text}], tokenizer, chunk_tokens=48, overlap=overlap)
    assert len(chunks) > 3 and all(c["n_tokens"] <= 48 for c in chunks)
    assert all(c["text"].endswith("on.") for c in chunks)  # cut after a sentence: there are no paragraphs
    spans = located(text, chunks)
    pairs = list(pairwise(chunks))
    if overlap:
        assert all(" ".join(b["text"].split()[:3]) in a["text"] for a, b in pairs)
        assert all(b_start < a_end for (_, a_end), (b_start, _) in pairwise(spans))
    else:
        assert all(b_start >= a_end for (_, a_end), (b_start, _) in pairwise(spans))
        assert re.sub(r"\s", "", "".join(c["text"] for c in chunks)) == re.sub(r"\s", "", text)


def test_short_document_and_hard_cuts(tokenizer):
    short = {"id": "s", "title": "T", "source": "s.txt", "text": "One short note."}
    assert chunk_documents([short], tokenizer, chunk_tokens=64, overlap=8) == [
        {"id": "s#0", "doc_id": "s", "title": "T", "source": "s.txt", "text": "One short note.", "n_tokens": 4}
    ]
    # No paragraph or sentence end to cut at: windows are cut at the token limit.
    run_on = {"id": "r", "title": "", "source": "r.txt", "text": " ".join(["apt pin priority"] * 40)}
    chunks = chunk_documents([run_on], tokenizer, chunk_tokens=16, overlap=4)
    assert all(c["n_tokens"] == 16 for c in chunks[:-1])
    for bad in ({"chunk_tokens": 8, "overlap": 0}, {"chunk_tokens": 32, "overlap": 32}, {"chunk_tokens": 32, "overlap": -1}):
        with pytest.raises(ValueError):
            chunk_documents([short], tokenizer, **bad)
