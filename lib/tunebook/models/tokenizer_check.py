"""Whether a tokenizer gives the rows' text back, and the one known way transformers breaks that.

A model can only learn the text its tokenizer encodes. `check_round_trip` asks a tokenizer to encode and decode a
sample of the run's own texts (prompts and answers) and stops the run, before anything is written, when one does
not come back as it went in, allowing only the normalization the tokenizer declares (its normalizer: NFC, NFKC,
lower-casing) and whitespace at the ends (SentencePiece's prefix space).

`keep_file_pipeline` (models/patches.py) handles the case that check was written for: transformers 5 builds the tokenizer class named in
tokenizer_config.json, and `LlamaTokenizer(Fast)` installs SentencePiece's Metaspace pre-tokenizer and decoder over
a byte-level BPE `tokenizer.json` (DeepSeek V3 / R1, the R1-Distill models, deepseek-coder / -math; transformers
issues 45488 and 48206). Every space is lost: "Which plant" trains as "Whichplant". Such a tokenizer is loaded from
its `tokenizer.json` pipeline as is, and saved so that every later load (vLLM, Ollama's importer, transformers 4 or 5)
does the same. It switches itself off once the installed transformers round-trips the file by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunebook.errors import TunebookError

# One sentence with spaces, digits, punctuation and a non-ASCII word: what a replaced pipeline gets wrong.
PROBE = "Which plant disease destroyed Irish potato crops from 1845? Ça, 3.5 km."
SAMPLE_ROWS = 64  # rows per split whose texts are checked (spread over the split)


class TokenizerError(TunebookError):
    """The tokenizer does not reproduce the run's text: the message names the class, an example and the fix."""


@dataclass(frozen=True)
class Mismatch:
    text: str  # what went in
    back: str  # what decode(encode(text)) gave
    where: str  # which row and message it came from


def decoded(tokenizer, text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def reproduces(tokenizer, text: str, back: str | None = None) -> bool:
    """decode(encode(text)) is the text, up to the tokenizer's declared normalizer and whitespace at the ends."""
    back = decoded(tokenizer, text) if back is None else back
    if back == text or back.strip() == text.strip():
        return True
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    if normalizer is None:
        return False
    return normalizer.normalize_str(back).strip() == normalizer.normalize_str(text).strip()


def mismatches(tokenizer, texts: list[tuple[str, str]]) -> list[Mismatch]:
    """The (where, text) pairs that do not come back, in order."""
    found = []
    for where, text in texts:
        back = decoded(tokenizer, text)
        if not reproduces(tokenizer, text, back):
            found.append(Mismatch(text, back, where))
    return found


def row_texts(rows: list[dict], split: str, per_split: int = SAMPLE_ROWS) -> list[tuple[str, str]]:
    """(where, text) for every message of a sample of rendered rows (01's prompt / completion messages), spread
    evenly over the split so that each source and topic is met."""
    step = max(1, len(rows) // per_split)
    texts = []
    for row in rows[::step][:per_split]:
        for message in row["prompt"] + row["completion"]:
            if message["content"]:
                texts.append((f"{split} row {row['id']} ({message['role']} message)", message["content"]))
    return texts


def check_round_trip(tokenizer, texts: list[tuple[str, str]], model: str) -> int:
    """Stop when a text does not come back from encode + decode, naming the class, the first example and the fix;
    else the number of texts checked."""
    found = mismatches(tokenizer, texts)
    if not found:
        return len(texts)
    first = found[0]
    went, came = _differing_window(first.text, first.back)
    raise TokenizerError(
        f"The tokenizer of {model} ({type(tokenizer).__name__}) does not give back the text it encodes, so the model would "
        f"be trained and scored on other text than your rows: {len(found)} of {len(texts)} sampled texts differ. "
        f"First, {first.where}:\n  went in:   {went!r}\n  came back: {came!r}\n{_fix(tokenizer, first)}"
    )


def _differing_window(text: str, back: str, width: int = 70) -> tuple[str, str]:
    """Both texts from a little before the first character where they differ."""
    at = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
    start = max(0, at - 20)
    return text[start : start + width], back[start : start + width]


def _fix(tokenizer, first: Mismatch) -> str:
    unk = getattr(tokenizer, "unk_token", None)
    if unk and unk in first.back and unk not in first.text:
        return (
            f"Fix: the vocabulary has no token for some characters, which become {unk}: set data.nfkc: true if they are "
            "full-width or compatibility forms, or pick a model whose tokenizer covers your language."
        )
    if "".join(first.back.split()) == "".join(first.text.split()):
        return (
            "Fix: the spaces are lost, the sign of a tokenizer class whose pre-tokenizer or decoder replaces the ones in "
            'tokenizer.json (transformers issues 45488, 48206). Set "tokenizer_class": "PreTrainedTokenizerFast" in the '
            "model's tokenizer_config.json (it then loads tokenizer.json as is), or use a transformers release that fixes it."
        )
    return (
        "Fix: the tokenizer's decoder does not undo its pre-tokenizer (compare tokenizer.json's \"pre_tokenizer\" and "
        '"decoder"; tokenizers.Tokenizer.from_file(".../tokenizer.json") shows what the file alone does). Repair the '
        "model's tokenizer files, or pick another model."
    )
