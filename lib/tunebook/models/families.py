"""What differs between model families, in one place: chat-template quirks, end of turn, padding, thinking blocks,
LoRA target names, float16 hazards.

Stages 01, 02, 03 and 04 and the Unsloth path all read a family's facts from here:
- `pin_template` fixes the template variables a run decides (`enable_thinking`, the Llama 3.x date header), inside
  the template itself, so every render (TRL, tunebook's generator, a saved model served by vLLM or Ollama) is alike;
- `chat_format` finds the end-of-turn token from the template itself (what it writes after an assistant answer)
  and names the family, so a template whose answer turn would never stop is refused;
- `training_tokens` renders one training example exactly as generation will be prompted, then the answer and the
  end-of-turn token, and refuses template text inside the completion (a reasoning block the model would learn);
- `split_reasoning` takes a `<think>` block out of an answer before it is scored;
- `linear_layer_names` reads the architecture's own linear layers (what `all-linear` means) from the model.

A family is recognised from its chat template (how turns are marked): SmolLM2 is a Llama architecture with a
ChatML template, so the architecture alone would say the wrong thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunebook.errors import TunebookError

# A fixed date for templates with a date header (Llama 3.1+): their fallback when no date is given. Without it each
# render prints today's date, so a model evaluated on another day than it was trained sees another prompt.
PINNED_DATE = "26 Jul 2024"
PIN_START, PIN_END = "{#- tunebook: pinned variables -#}", "{#- tunebook: end -#}\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Architectures whose activations overflow float16 (max 65504): Gemma 3 gives empty answers and infinite gradients
# in float16 (transformers issue 36822; Unsloth loads it in float32 on GPUs without bfloat16, unsloth PR 2050).
FLOAT16_OVERFLOW = {"gemma3": "Gemma 3", "gemma3_text": "Gemma 3", "gemma2": "Gemma 2"}
# Architectures that learned no answer format through Unsloth's trainer in the family matrix, where the same run on
# transformers did (bench/README.md, the family matrix): model.backend auto trains them with transformers.
UNSLOTH_UNPROVEN = {"gemma3": "Gemma 3", "gemma3_text": "Gemma 3"}


class TemplateError(TunebookError):
    """The chat template would train or prompt the model wrongly: the message names the family and the fix."""


@dataclass(frozen=True)
class Family:
    name: str
    markers: tuple[str, ...]  # text that only this family's chat template holds (all of them)
    end_of_turn: str  # the token that ends an assistant turn
    pad_tokens: tuple[str, ...] = ()  # pad tokens distinct from end of turn, most preferred first
    note: str = ""


# Most specific first: Qwen3 and Qwen 2.5 are ChatML too.
FAMILIES = (
    Family("Llama 3.x", ("<|start_header_id|>",), "<|eot_id|>", ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"), "date header pinned"),
    Family("Qwen3", ("<|im_start|>", "enable_thinking"), "<|im_end|>", ("<|endoftext|>",), "thinking switch"),
    Family("Qwen 2.5", ("<|im_start|>", "You are Qwen"), "<|im_end|>", ("<|endoftext|>",), "default system prompt"),
    Family("Phi-4", ("<|im_sep|>",), "<|im_end|>", ("<|dummy_85|>", "<|endoftext|>")),
    Family("ChatML (SmolLM2 and others)", ("<|im_start|>",), "<|im_end|>", ("<|endoftext|>", "<|pad|>")),
    Family("Gemma", ("<start_of_turn>",), "<end_of_turn>", ("<pad>",), "system message folded into the first user turn"),
    Family("Phi-3", ("<|assistant|>", "<|end|>"), "<|end|>", ("<|endoftext|>",), "end of turn is not the tokenizer's EOS"),
    Family("Mistral", ("[INST]",), "</s>", ("<pad>", "[control_8]")),
    Family("DeepSeek V3 / R1", ("<｜Assistant｜>",), "<｜end▁of▁sentence｜>", ("<｜▁pad▁｜>",), "R1 templates open a reasoning block"),
)


@dataclass(frozen=True)
class ChatFormat:
    """How one tokenizer's template frames an answer: its family, the end-of-turn token and the ids that stop."""

    family: str
    end_of_turn: str
    end_of_turn_id: int
    stop_ids: tuple[int, ...]
    thinking_switch: bool
    enable_thinking: bool


def pin_template(template: str, enable_thinking: bool) -> str:
    """The template with the variables it reads fixed at its top (replacing an earlier pin): enable_thinking as the
    params say, the date header's date. Saved with the model, so serving engines render the same prompts."""
    body = template.split(PIN_END, 1)[1] if template.startswith(PIN_START) and PIN_END in template else template
    sets = []
    if "enable_thinking" in body:
        sets.append(f"{{%- set enable_thinking = {'true' if enable_thinking else 'false'} -%}}")
    if "date_string" in body:
        sets.append(f'{{%- set date_string = "{PINNED_DATE}" -%}}')
    return PIN_START + "".join(sets) + PIN_END + body if sets else body


def family_of(template: str) -> Family | None:
    return next((f for f in FAMILIES if all(m in template for m in f.markers)), None)


def special_tokens(tokenizer) -> list[str]:
    """Every token the tokenizer treats as special or added (turn markers are added tokens in most vocabularies)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


PROBE_ANSWER = "tunebook-probe-answer"


def chat_format(tokenizer, model_config=None, enable_thinking: bool = False) -> ChatFormat:
    """The tokenizer's chat format, read off its template: the first special token the template writes after an
    assistant answer ends the turn. A template that writes none (or not the family's) is refused."""
    template = tokenizer.chat_template or ""
    family = family_of(template)
    name = family.name if family else "an unrecognised chat template"
    rendered = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_ANSWER}])
    after = rendered.split(PROBE_ANSWER, 1)[1] if PROBE_ANSWER in rendered else ""
    found = [(after.find(t), t) for t in special_tokens(tokenizer) if t and t in after]
    if not found:
        raise TemplateError(
            f"The chat template ({name}) writes no special token after an assistant answer, so a fine-tuned model "
            "would never learn to stop. Name a template that ends the turn in model.chat_template."
        )
    end_of_turn = min(found)[1]
    if family and end_of_turn != family.end_of_turn:
        raise TemplateError(
            f"The {family.name} chat template ends an answer with {end_of_turn!r}, not the family's {family.end_of_turn!r}: "
            "the template was changed. Leave model.chat_template empty or name the family's own template."
        )
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    configured = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    configured = configured if isinstance(configured, list) else [configured]
    stops = {eot_id, tokenizer.eos_token_id, *(i for i in configured if i is not None)}
    return ChatFormat(
        family=name,
        end_of_turn=end_of_turn,
        end_of_turn_id=eot_id,
        stop_ids=tuple(sorted(i for i in stops if i is not None)),
        thinking_switch="enable_thinking" in template,
        enable_thinking=enable_thinking,
    )


def choose_pad_token(tokenizer, end_of_turn: str) -> None:
    """A pad token that is not the end-of-turn token where the vocabulary has one (a collator that masks pad ids
    would otherwise mask the token that teaches the model to stop); else the end-of-turn token, which is safe
    here because the loss mask comes from the completion, never from the pad id (02 checks it)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token != end_of_turn:
        return
    family = family_of(tokenizer.chat_template or "")
    vocab = tokenizer.get_vocab()
    candidates = [t for t in (family.pad_tokens if family else ()) if t in vocab]
    candidates += [t for t in ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>") if t in vocab]
    tokenizer.pad_token = next((t for t in candidates if t != end_of_turn), tokenizer.pad_token or tokenizer.eos_token)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template applied; a template that refuses the conversation (Gemma 2 has no system role, some
    templates insist on alternating turns) stops with its own words."""
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as e:
        family = family_of(tokenizer.chat_template or "")
        raise TemplateError(
            f"The {family.name if family else 'model'}'s chat template refused the conversation: {e}. "
            "Without a system role, leave prompt.system empty; or name another template in model.chat_template."
        ) from None


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """A conversation as the model is prompted to answer it (the template's generation prompt included)."""
    return render(tokenizer, messages, add_generation_prompt=True)


def training_text(tokenizer, fmt: ChatFormat, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
    """(prompt text, completion text) of one training example: the prompt exactly as generation renders it, then
    what the template writes for the answer, up to and including the end-of-turn token (nothing after it)."""
    prompt_text = render_prompt(tokenizer, prompt)
    full = render(tokenizer, prompt + completion)
    if not full.startswith(prompt_text):
        at = next((i for i, (a, b) in enumerate(zip(full, prompt_text)) if a != b), min(len(full), len(prompt_text)))
        raise TemplateError(
            f"The {fmt.family} template renders the prompt differently alone (as generation sees it) than before an answer "
            f"(as training sees it), from {prompt_text[at : at + 40]!r} vs {full[at : at + 40]!r}: the model would be trained on "
            "a context it never sees when answering. Set model.chat_template to a template without this drift."
        )
    rest = full[len(prompt_text) :]
    end = rest.find(fmt.end_of_turn)
    if end < 0:
        raise TemplateError(f"The {fmt.family} template wrote no {fmt.end_of_turn!r} after the answer: the model would never learn to stop.")
    completion_text = rest[: end + len(fmt.end_of_turn)]
    answer = "".join(m["content"] for m in completion)
    written = completion_text[: -len(fmt.end_of_turn)]
    if written.strip() != answer.strip():
        reasoning, rest_of_answer = split_reasoning(written)
        if reasoning is not None and rest_of_answer.strip() == answer.strip() and fmt.enable_thinking:
            return prompt_text, completion_text  # thinking mode: the template's reasoning block is the family's format
        extra = written.replace(answer.strip(), "…answer…", 1)
        fix = (
            "model.enable_thinking is false, yet the template writes a reasoning block into the answer (a template "
            "without a working thinking switch, or a thinking-only model): set model.enable_thinking: true to train the "
            "family's thinking format (the block is taken out before scoring), or name another template in "
            "model.chat_template"
            if reasoning is not None
            else "set model.chat_template to a template that writes the answer alone"
        )
        raise TemplateError(
            f"The {fmt.family} template puts text of its own into the training answer ({extra!r}), so the model would "
            f"learn to print it and every answer would be scored with it: {fix}."
        )
    return prompt_text, completion_text


def training_tokens(tokenizer, fmt: ChatFormat, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one training example, each tokenized as generation meets it: the prompt
    alone, then the answer tokens after it. The completion ends with the end-of-turn id."""
    prompt_text, completion_text = training_text(tokenizer, fmt, prompt, completion)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    if not completion_ids or completion_ids[-1] != fmt.end_of_turn_id:
        raise TemplateError(f"The {fmt.family} answer does not tokenize to end with {fmt.end_of_turn!r} (id {fmt.end_of_turn_id}).")
    return prompt_ids, completion_ids


_REASONING = re.compile(r"^\s*(?:<think>)?(.*?)</think>\s*", re.S)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer): a leading `<think>…</think>` block (or text up to a `</think>`, when the prompt opened
    the block) taken out of a model's output; an unclosed `<think>` is all reasoning. (None, text) without one."""
    match = _REASONING.match(text)
    if match:
        return match.group(1).strip(), text[match.end() :]
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN) :].strip(), ""
    return None, text


def linear_layer_names(model) -> list[str]:
    """The names of the model's own linear layers below the LM head (q_proj ... down_proj for Llama, qkv_proj and
    gate_up_proj for Phi-3): what `all-linear` means for this architecture, read from the model itself."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith(("lm_head", "embed_tokens", "score")):
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise TunebookError(f"{type(model).__name__} has no linear layers to put LoRA adapters on.")
    return sorted(names)


def unsloth_hazard(model_type: str | None) -> str | None:
    """Why model.backend auto does not pick Unsloth for this architecture, or None."""
    family = UNSLOTH_UNPROVEN.get(model_type or "")
    if family is None:
        return None
    return (
        f"through Unsloth's trainer a tiny {family} learned no answer format in tunebook's family matrix (0% of its answers, "
        "where the same run on transformers reached 100%; the two backends' forward passes and LoRA steps agree, and the "
        "cause is not isolated yet)"
    )


def float16_hazard(model_type: str | None) -> str | None:
    """The family name when this architecture is known to overflow in float16, else None."""
    return FLOAT16_OVERFLOW.get(model_type or "")
