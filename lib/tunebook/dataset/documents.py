"""Stage 01 from documents: read a folder of documents (or a JSONL of them) and cut them into token windows.

Text files are read as UTF-8, HTML through BeautifulSoup, PDF through pypdf (text layer only: no OCR). Chunks are
exact slices of the document text, cut by the model's own tokenizer so that a chunk's size is what the model sees.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunebook.run.rows import DataError, field_value, read_jsonl, read_text

DOCUMENT_SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf")
_SENTENCE_ENDS = ".?!"
_CJK_SENTENCE_ENDS = "。！？"  # written without a following space


def read_documents(path: str | Path, *, id_field="id", text_field="text", title_field="title") -> list[dict]:
    """Documents as {"id", "title", "text", "source"}: every .txt/.md/.html/.htm/.pdf file under a folder (recursive,
    sorted by relative path), or the rows of a .jsonl file (fields named by id_field/text_field/title_field; dotted
    names allowed via field_value)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Documents not found: {path}")
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl_documents(path, id_field, text_field, title_field)
    if suffix not in DOCUMENT_SUFFIXES:
        raise DataError(
            f"{path}: unsupported document type '{suffix}'. Use a folder of documents, one {', '.join(DOCUMENT_SUFFIXES)} "
            "file, or a .jsonl file with one document per row."
        )
    return _with_text([_read_file(path, path.parent)], str(path))


def _read_folder(folder: Path) -> list[dict]:
    files = _visible_files(folder)
    others = [f for f in files if f.suffix.lower() not in DOCUMENT_SUFFIXES]
    if others:
        suffixes = sorted({f.suffix.lower() or "(no suffix)" for f in others})
        names = [f.relative_to(folder).as_posix() for f in others]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        print(f"Skipped {len(others)} file(s) that are not documents ({', '.join(suffixes)}): {', '.join(names[:5])}{more}")
    documents = [_read_file(f, folder) for f in files if f.suffix.lower() in DOCUMENT_SUFFIXES]
    if not documents:
        raise DataError(f"{folder}: no documents found. Documents are files ending in {', '.join(DOCUMENT_SUFFIXES)} (subfolders included).")
    return _with_text(documents, str(folder))


def _visible_files(folder: Path) -> list[Path]:
    """Files under folder, sorted by relative path; hidden files and folders (.git, .ipynb_checkpoints) left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".")]
    return sorted(found, key=lambda f: f.relative_to(folder).as_posix())


def _read_file(path: Path, root: Path) -> dict:
    relative = path.relative_to(root).as_posix()
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        title, text = _read_pdf(path)
    elif suffix in (".html", ".htm"):
        title, text = _read_html(read_text(path))
    else:
        text = read_text(path)
        title = _markdown_title(text) if suffix == ".md" else ""
    return {"id": relative, "title": title or path.stem, "text": _normalize(text), "source": relative}


def _markdown_title(text: str) -> str:
    return next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "")


def _read_html(html: str) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    headings = [tag.get_text(" ", strip=True) for tag in (soup.title, soup.h1) if tag is not None]
    # Lines are stripped on both sides: their leading spaces are the markup's indentation.
    text = "\n".join(line.strip() for line in soup.get_text("\n").splitlines())
    return next((h for h in headings if h), ""), text


def _read_pdf(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        title = str((reader.metadata.title if reader.metadata else None) or "").strip()
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as e:  # pypdf raises many types on broken or encrypted files; the user needs one sentence
        raise DataError(f"Cannot read PDF {path}: {str(e).strip() or type(e).__name__}.") from None
    return title, text


def _normalize(text: str) -> str:
    """Unix newlines, NBSP as a space, no trailing spaces, at most one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _with_text(documents: list[dict], where: str) -> list[dict]:
    """The documents that have text; the others are named, since an empty one usually means a scanned PDF."""
    empty = [d for d in documents if not d["text"]]
    if empty:
        names = [
            d["source"] + (" (a PDF without a text layer, e.g. scanned: run OCR on it first)" if d["source"].lower().endswith(".pdf") else "") for d in empty
        ]
        print(f"Skipped {len(empty)} document(s) with no text: {'; '.join(names)}")
    kept = [d for d in documents if d["text"]]
    if not kept:
        raise DataError(f"{where}: none of the documents has any text.")
    return kept


def _read_jsonl_documents(path: Path, id_field: str, text_field: str, title_field: str) -> list[dict]:
    documents, seen = [], set()
    for number, row in enumerate(read_jsonl(path), start=1):
        text = field_value(row, text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} row {number}: needs text in '{text_field}' (a non-empty string). Fields present: {sorted(row)}.")
        doc_id = field_value(row, id_field)
        doc_id = str(number) if doc_id in (None, "") else str(doc_id)
        if doc_id in seen:
            raise DataError(f"{path} row {number}: duplicate id '{doc_id}' in field '{id_field}'.")
        seen.add(doc_id)
        title = field_value(row, title_field)
        documents.append({"id": doc_id, "title": "" if title is None else str(title), "text": _normalize(text), "source": f"{path.name}:{doc_id}"})
    if not documents:
        raise DataError(f"{path}: no documents (the file has no rows).")
    return documents


def chunk_documents(documents: list[dict], tokenizer, *, chunk_tokens: int, overlap: int) -> list[dict]:
    """Each document cut into windows of at most chunk_tokens tokens (the tokenizer's), consecutive windows sharing
    `overlap` tokens; each chunk keeps its document's id, title and source."""
    if chunk_tokens < 16 or not 0 <= overlap < chunk_tokens:
        raise ValueError(f"chunk_tokens must be >= 16 and 0 <= overlap < chunk_tokens, got chunk_tokens={chunk_tokens}, overlap={overlap}.")
    chunks = []
    for doc in documents:
        text = doc["text"]
        # Offsets, not decoded ids: a chunk is an exact slice of the text. verbose=False: long documents are expected.
        spans = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)["offset_mapping"]
        n = 0
        for start, end in _windows(text, spans, chunk_tokens, overlap):
            piece = text[spans[start][0] : spans[end - 1][1]].strip()
            if not piece:
                continue
            chunks.append(
                {"id": f"{doc['id']}#{n}", "doc_id": doc["id"], "title": doc["title"], "source": doc["source"], "text": piece, "n_tokens": end - start}
            )
            n += 1
    return chunks


def _windows(text: str, spans: list[tuple[int, int]], chunk_tokens: int, overlap: int):
    """(start, end) token ranges; a full window ends at a paragraph or sentence end in its second half if it has one."""
    start = 0
    while start < len(spans):
        end = min(start + chunk_tokens, len(spans))
        if end < len(spans):
            end = _boundary(text, spans, start + chunk_tokens // 2, end)
        yield start, end
        if end == len(spans):
            return
        start = max(end - overlap, start + 1)


def _boundary(text: str, spans: list[tuple[int, int]], low: int, end: int) -> int:
    """The last window end in (low, end] after a paragraph break, else after a sentence end, else `end`."""
    candidates = range(end, low, -1)
    for stop in candidates:
        if text.endswith("\n\n", 0, spans[stop - 1][1]):
            return stop
    for stop in candidates:
        if _ends_sentence(text, spans[stop - 1][1]):
            return stop
    return end


def _ends_sentence(text: str, at: int) -> bool:
    """text[:at] ends a sentence: ".", "?" or "!" followed by whitespace (so not the point in "3.5"), or a CJK full stop."""
    last = text[at - 1] if at > 0 else ""
    if last in _CJK_SENTENCE_ENDS:
        return True
    return last in _SENTENCE_ENDS and (at == len(text) or text[at].isspace())
