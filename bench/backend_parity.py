"""The same model and batch through transformers and through Unsloth: do the two backends compute the same loss?

    python bench/backend_parity.py [--families gemma3 llama3_1 ...] [--variants as_built ...] [--out DIR]

For each tiny family model of bench/family_matrix.py (random weights, the family's real tokenizer), one batch of
training rows rendered as 02 renders them goes through (1) transformers' own model class and (2) Unsloth's
FastLanguageModel with its LoRA adapters attached (B = 0, so the function is the base model's), each in its own
process (Unsloth patches transformers' classes when imported). The losses on the answer tokens and the logits are
compared. A backend that computes another function than the architecture's own trains something else: that is what
the family matrix saw for Gemma 3 on Unsloth. Variants change one attribute of the tiny config at a time, to find which
one the backends disagree on. Needs a CUDA GPU and Unsloth; writes bench/results/backend_parity.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
BACKENDS = ("hf", "unsloth", "unsloth_inference")  # transformers; Unsloth training forward; Unsloth after for_inference

# Config attributes a tiny model sets differently from the real checkpoints; one changed per variant.
VARIANTS = {
    "as_built": {},
    "attention_scale_of_head_dim": {"query_pre_attn_scalar": 16},  # the real Gemma 3 scales by its head_dim (256)
    "no_sliding_window": {"sliding_window": 4096},  # real windows (512-4096) exceed these short rows
}


def model_folder(family: str, variant: str, work: Path) -> Path:
    import family_matrix

    base = family_matrix.tiny_model(family, work / "models" / family)
    if not VARIANTS[variant]:
        return base
    folder = work / "models" / f"{family}-{variant}"
    if not folder.exists():
        shutil.copytree(base, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(VARIANTS[variant])
        (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def batch(family: str, folder: Path, work: Path):
    """input_ids, labels (answer tokens and end of turn only) of 8 rows, as 02 tokenizes them."""
    import family_matrix
    import torch

    from tunebook.dataset.build import with_chat
    from tunebook.models.families import chat_format, training_tokens
    from tunebook.models.load import load_tokenizer
    from tunebook.params.schema import PromptParams

    tokenizer = load_tokenizer(str(folder))
    fmt = chat_format(tokenizer)
    rows = [json.loads(line) for line in family_matrix.write_rows(work / "rows.jsonl", n=8).read_text().splitlines()]
    prompt = PromptParams(system="Answer with one word.", instruction="Answer from the passage.")
    examples = [with_chat({"id": r["id"], "question": r["question"], "passages": r["passages"], "answers": r["answers"]}, prompt) for r in rows]
    pairs = [training_tokens(tokenizer, fmt, e["prompt"], e["completion"]) for e in examples]
    width = max(len(p) + len(c) for p, c in pairs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return ids, labels, mask


def train_steps(model, backend: str, ids, labels, mask, steps: int) -> dict:
    """LoRA r16 on every linear layer, AdamW at the family matrix's rate, the same batch `steps` times: the losses
    (from the logits, as the matrix's 02 computes them) and what is trainable. The hf model gets PEFT's LoRA here."""
    import torch

    if backend == "hf":
        from peft import LoraConfig, get_peft_model

        from tunebook.models.families import linear_layer_names

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=linear_layer_names(model), task_type="CAUSAL_LM"))
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 3))
    return {
        "losses": losses,
        "trainable_tensors": len(trainable),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_trainable": trainable[:4],
    }


def one_case(backend: str, family: str, variant: str, work: Path, steps: int = 0) -> dict:
    """Run in a fresh process: the loss and logits of one backend."""
    import torch

    folder = model_folder(family, variant, work)
    ids, labels, mask = batch(family, folder, work)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the hf case only, to try the script
    if backend.startswith("unsloth"):
        import os

        os.environ["UNSLOTH_RETURN_LOGITS"] = "1"  # else its training forward may hand back no logits
        from unsloth import FastLanguageModel

        from tunebook.models.families import linear_layer_names

        model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=256, dtype=torch.bfloat16, load_in_4bit=False)
        targets = linear_layer_names(model)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=targets, use_gradient_checkpointing="unsloth")
        if backend == "unsloth_inference":
            FastLanguageModel.for_inference(model)
        else:
            model.train()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).to(device)
        model.train()
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    if steps:
        return {"backend": backend, "family": family, "variant": variant, **train_steps(model, backend, ids, labels, mask, steps)}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits.float()
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    loss = torch.nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100).item()
    torch.save(logits[mask.bool()].cpu(), work / f"logits-{backend}-{family}-{variant}.pt")
    import transformers

    versions = {"transformers": transformers.__version__}
    if backend.startswith("unsloth"):
        import unsloth

        versions["unsloth"] = unsloth.__version__
    return {"backend": backend, "family": family, "variant": variant, "loss": loss, **versions}


def compare(family: str, variant: str, work: Path) -> dict:
    import torch

    cases = {}
    for backend in BACKENDS:
        command = [sys.executable, __file__, "case", backend, family, variant, "--out", str(work)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            return {"family": family, "variant": variant, "error": f"{backend}: {result.stderr[-1500:]}"}
        cases[backend] = json.loads(result.stdout.strip().splitlines()[-1])
    logits = {b: torch.load(work / f"logits-{b}-{family}-{variant}.pt") for b in BACKENDS}
    row = {"family": family, "variant": variant, **{f"loss_{b}": round(cases[b]["loss"], 4) for b in BACKENDS}}
    row["logits_scale"] = round(logits["hf"].abs().mean().item(), 4)
    for b in BACKENDS[1:]:
        row[f"max_abs_diff_{b}"] = round((logits["hf"] - logits[b]).abs().max().item(), 4)
        row[f"same_top_token_{b}"] = round((logits["hf"].argmax(-1) == logits[b].argmax(-1)).float().mean().item(), 4)
    row["versions"] = cases["unsloth"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    case = sub.add_parser("case")
    case.add_argument("backend", choices=BACKENDS)
    case.add_argument("family")
    case.add_argument("variant", choices=list(VARIANTS))
    case.add_argument("--out", type=Path, required=True)
    case.add_argument("--steps", type=int, default=0, help="train this many steps on the batch instead (hf or unsloth)")
    parser.add_argument("--families", nargs="+", default=["gemma3", "llama3_1", "qwen3"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "backend_parity")
    args = parser.parse_args()
    if args.command == "case":
        print(json.dumps(one_case(args.backend, args.family, args.variant, args.out, args.steps)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families:
        for variant in args.variants if family == "gemma3" else ["as_built"]:
            rows.append(compare(family, variant, args.out))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backend_parity.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| family | variant | loss hf | loss unsloth (train) | loss unsloth (inference) | mean abs logit | max abs diff train / inference | same top token train / inference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['variant']} | error | | | | | |")
            continue
        lines.append(
            f"| {r['family']} | {r['variant']} | {r['loss_hf']} | {r['loss_unsloth']} | {r['loss_unsloth_inference']} | {r['logits_scale']} | "
            f"{r['max_abs_diff_unsloth']} / {r['max_abs_diff_unsloth_inference']} | {r['same_top_token_unsloth']:.0%} / {r['same_top_token_unsloth_inference']:.0%} |"
        )
    table = "\n".join(lines) + "\n\nProduced by `python bench/backend_parity.py` on one GPU.\n"
    (RESULTS / "backend_parity.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
