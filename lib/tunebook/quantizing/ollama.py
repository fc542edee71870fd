"""Ollama Modelfiles for the GGUF copies: `quantized/<copy>.Modelfile` beside `quantized/<copy>.gguf`, so that
`ollama create NAME -f quantized/gguf_q8_0.Modelfile` works as it is.

A Modelfile holds `FROM ./<copy>.gguf`, the family's chat template in Ollama's Go-template syntax (over `.Messages`,
so a system message, earlier turns and the next user turn render as the tokenizer's own template renders them, with
the generation prompt at the end), `PARAMETER stop` for the family's end-of-turn tokens (and `evaluate.stop_strings`),
temperature 0 (the greedy answers the workbook scores) and `num_ctx` from `model.max_seq_length`. `prompt.system`,
when set, becomes its `SYSTEM`: the model was trained with it, and Ollama adds it to a chat that has none.

Families: ChatML (SmolLM2 and others, with the template's default system message when the chat has none), Qwen 2.5
(its default system message), Qwen3 (the non-thinking mode's empty `<think>` block after the generation prompt, as
`model.enable_thinking: false` trains it), Llama 3.x (with or without the date header, pinned as in training) and
Gemma 3 (the system message folded into the first user turn). For other families the Modelfile leaves TEMPLATE out
and says so: Ollama then picks a template from the GGUF's own chat template.

Differences left: the Llama 3.x and Gemma templates trim each message's surrounding whitespace, which Go templates
cannot; a leading BOS token is left to the engine when the GGUF asks for one (`tokenizer.ggml.add_bos_token`), as
Ollama adds it, and written into the template otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunebook.models.families import PINNED_DATE, chat_format, family_of, render

SUFFIX = ".Modelfile"
PROBE_SYSTEM = "tunebook-probe-system"


@dataclass(frozen=True)
class OllamaTemplate:
    """A family's chat template as Ollama renders it: the Go template, and the BOS text the engine adds before it
    (empty when the template writes none or writes it itself)."""

    family: str
    template: str | None  # None: no Go template for this family (Ollama picks one from the GGUF)
    engine_bos: str = ""


def modelfile_path(gguf: str | Path) -> Path:
    """quantized/gguf_q8_0.gguf -> quantized/gguf_q8_0.Modelfile"""
    return Path(gguf).with_suffix(SUFFIX)


def default_system(tokenizer) -> str | None:
    """The system message a ChatML template writes when the chat has none (SmolLM2's, Qwen 2.5's), else None."""
    rendered = render(tokenizer, [{"role": "user", "content": "Hi"}])
    match = re.match(r"^(?:<\|endoftext\|>)?<\|im_start\|>system\n(.*?)<\|im_end\|>\n", rendered, re.S)
    return match.group(1) if match else None


def _pinned_date(template: str) -> str:
    match = re.search(r'set date_string = "([^"]+)"', template)
    return match.group(1) if match else PINNED_DATE


def _chatml(default: str | None, after_prompt: str = "") -> str:
    # Every message as <|im_start|>role\ncontent<|im_end|>\n; the default system message only when the chat opens
    # without one; the generation prompt last.
    head = (
        '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n' + default + "<|im_end|>\n{{ end }}"
        if default is not None
        else ""
    )
    return head + "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n" + after_prompt


def _llama3(date_header: str | None) -> str:
    turn = "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>"
    if date_header is None:  # Llama 3.0's template: every message as a turn
        body = "{{ range $i, $m := .Messages }}" + turn + "{{ end }}"
    else:  # 3.1+: a system turn always, with the date lines and the first message when it is the system's
        body = (
            "<|start_header_id|>system<|end_header_id|>\n\n" + date_header + '{{ if and .Messages (eq (index .Messages 0).Role "system") }}'
            "{{ (index .Messages 0).Content }}{{ end }}<|eot_id|>"
            '{{ range $i, $m := .Messages }}{{ if not (and (eq $i 0) (eq $m.Role "system")) }}' + turn + "{{ end }}{{ end }}"
        )
    return body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _gemma() -> str:
    # A first system message is no turn of its own: its text and a blank line open the first user turn.
    return (
        '{{ range $i, $m := .Messages }}{{ if not (and (eq $i 0) (eq $m.Role "system")) }}'
        '<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}\n'
        '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}{{ (index $.Messages 0).Content }}\n\n{{ end }}'
        "{{ $m.Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
    )


def ollama_template(tokenizer, add_bos: bool | None = None) -> OllamaTemplate:
    """The tokenizer's chat template (tunebook's, variables pinned) as an Ollama Go template. `add_bos`: whether the
    engine puts the BOS token before the prompt itself (the GGUF's tokenizer.ggml.add_bos_token); None = it does
    when the template starts with it."""
    source = tokenizer.chat_template or ""
    family = family_of(source)
    name = family.name if family else "an unrecognised chat template"
    fmt = chat_format(tokenizer)
    if name == "Llama 3.x":
        date = f"Cutting Knowledge Date: December 2023\nToday Date: {_pinned_date(source)}\n\n" if "Cutting Knowledge Date" in source else None
        body = _llama3(date)
    elif name == "Gemma":
        body = _gemma()
    elif name == "Qwen3":
        body = _chatml(None, "" if fmt.enable_thinking or "set enable_thinking = true" in source else "<think>\n\n</think>\n\n")
    elif name in ("Qwen 2.5", "ChatML (SmolLM2 and others)"):
        body = _chatml(default_system(tokenizer))
    else:
        return OllamaTemplate(name, None)
    bos = tokenizer.bos_token or ""
    # Llama 3.x and Gemma write {{ bos_token }} before the first turn; ChatML's BOS (SmolLM2's <|im_start|>) opens a turn.
    if not (bos and "bos_token" in source and render(tokenizer, [{"role": "user", "content": "Hi"}]).startswith(bos)):
        return OllamaTemplate(name, body)
    if add_bos is None or add_bos:
        return OllamaTemplate(name, body, engine_bos=bos)
    return OllamaTemplate(name, bos + body)


def stop_tokens(tokenizer, extra: list[str] = ()) -> list[str]:
    """What ends an answer: the end-of-turn token, the other stop ids' tokens, the family's turn opener (a model that
    skips its end of turn and starts a new turn is cut there) and the run's stop strings."""
    fmt = chat_format(tokenizer)
    family = family_of(tokenizer.chat_template or "")
    opener = family.markers[0] if family and family.markers[0].startswith("<") else None
    stops = [fmt.end_of_turn, *tokenizer.convert_ids_to_tokens(list(fmt.stop_ids)), *([opener] if opener else []), *extra]
    return list(dict.fromkeys(s for s in stops if s))


def quoted(value: str) -> str:
    """A Modelfile argument: triple quotes around text with a newline or a quote, plain quotes otherwise (Ollama's
    parser takes both, and unquotes without escapes)."""
    if '"""' in value:
        raise ValueError(f"a Modelfile value cannot hold three double quotes: {value!r}")
    return f'"""{value}"""' if "\n" in value or '"' in value else f'"{value}"'


def modelfile_text(
    gguf_name: str, template: OllamaTemplate, stops: list[str], num_ctx: int, system: str | None = None, comment: str = "", temperature: float = 0
) -> str:
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines.append(f"FROM ./{gguf_name}")
    if template.template is not None:
        lines.append(f"TEMPLATE {quoted(template.template)}")
    else:
        lines.append(f"# No TEMPLATE: tunebook has no Ollama template for {template.family}; Ollama picks one from the GGUF's chat template.")
    if system:
        lines.append(f"SYSTEM {quoted(system)}")
    lines += [f"PARAMETER stop {quoted(s)}" for s in stops]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def gguf_adds_bos(gguf: str | Path) -> bool | None:
    """tokenizer.ggml.add_bos_token of a GGUF file (None when it does not say, or the gguf package is missing)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.parts[field.data[0]][0]) if field is not None else None


def write_modelfile(run, gguf: str | Path) -> Path:
    """The Modelfile beside one GGUF copy of a run's fine-tuned model (its tokenizer and template, saved with the adapter)."""
    from tunebook.models.load import load_tokenizer

    p = run.params
    tokenizer = load_tokenizer(run.outputs_of("02_finetune").adapter_dir, p.model.chat_template, p.model.enable_thinking)
    gguf = Path(gguf)
    template = ollama_template(tokenizer, gguf_adds_bos(gguf))
    comment = (
        f"tunebook run {p.run_name}: {gguf.name}, fine-tuned from {p.model.name} ({template.family} chat format).\n"
        f"ollama create {p.run_name} -f {gguf.with_suffix(SUFFIX).name}   (from this folder), then ollama run {p.run_name}\n"
        "The user message it was trained on: prompt.template of the run's params.yaml (see the model card)."
    )
    path = modelfile_path(gguf)
    text = modelfile_text(gguf.name, template, stop_tokens(tokenizer, p.evaluate.stop_strings), p.model.max_seq_length, p.prompt.system, comment)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
