"""What each stage records in the run's manifest, as named fields: the stage writes one of these records and the
stages after it (and compare, sweeps, the error browser) read it back through `Run.outputs_of`. A field renamed or
dropped here breaks its writer and its readers alike, instead of a `KeyError` three notebooks later.

Paths are strings, as JSON holds them. A manifest written by an older tunebook may lack a field added since: it
reads as the field's default where there is one, and as a clear error naming the stage to re-run where there is not.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from tunebook.errors import TunebookError


@dataclass(frozen=True)
class Recorded:
    def as_json(self) -> dict:
        """The manifest's form: optional fields left unset are left out, as they read back the same."""
        unset = {f.name for f in fields(self) if f.default is None and getattr(self, f.name) is None}
        return {k: v for k, v in asdict(self).items() if k not in unset}

    @classmethod
    def from_json(cls, recorded: dict, where: str):
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in recorded and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise TunebookError(f"{where} records no {', '.join(missing)} (written by an older tunebook?): re-run that stage.")
        return cls(**{k: v for k, v in recorded.items() if k in names})


@dataclass(frozen=True)
class DatasetOutputs(Recorded):
    """01_build_dataset."""

    dataset_dir: str  # the splits as a `datasets` folder, what 02 trains on
    train_jsonl: str
    eval_jsonl: str
    table: list[dict]  # per split: rows, token lengths
    labels: list[str]  # the class labels of a classification task, else empty
    lengths: dict[str, list[int]]  # tokens per example, per split
    relabeled: dict[str, int] = field(default_factory=dict)  # 05's relabel marks applied, by kind
    eval_overlap: dict = field(default_factory=dict)
    gold_missing: dict | None = None  # RAG tasks: rows whose gold answer is in none of their passages
    synthetic: dict | None = None  # rows written by a teacher model: its chunks, pairs and failures


@dataclass(frozen=True)
class FinetuneOutputs(Recorded):
    """02_finetune."""

    backend: str
    family: str  # the chat format's family (llama3, qwen3, ...)
    stop_ids: list[int]
    adapter_dir: str
    merged_dir: str
    train_log: str
    steps: int
    train_examples: int
    train_seconds: float  # this session's: after a resume, the steps since the checkpoint
    train_loss: float | None
    batching: str | None = None
    resumed_from_step: int = 0
    trained_prompt: dict | None = None  # the first training prompt's ids: 04 checks it prompts every model the same way
    loss_example: dict | None = None
    tokens_per_second: float | None = None
    measured_steps: int | None = None
    checkpoints_written: int | None = None
    peak_gpu_memory_gb: float | None = None  # of the main process's GPU
    num_processes: int = 1  # that trained together (train.num_processes); tokens_per_second is all of theirs
    # train.report_to's run, what 04 and 05 log to (tunebook.run.tracking): the tracker, run_name, and its log_dir
    # (tensorboard), run_id (wandb, mlflow), project (wandb, trackio), tracking_uri without credentials (mlflow).
    tracker: dict | None = None


@dataclass(frozen=True)
class QuantizedCopy(Recorded):
    """One quantized copy made (or not) by 03."""

    name: str
    method: str
    bits: int | None
    format: str
    status: str  # ok, skipped or failed
    reason: str | None = None  # why it was skipped or failed
    path: str | None = None
    size_mb: float | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class QuantizeOutputs(Recorded):
    """03_quantize."""

    variants: list[QuantizedCopy]

    @classmethod
    def from_json(cls, recorded: dict, where: str):
        copies = [QuantizedCopy.from_json(v, where) for v in recorded.get("variants", [])]
        return super().from_json({**recorded, "variants": copies} if "variants" in recorded else recorded, where)


@dataclass(frozen=True)
class EvaluateOutputs(Recorded):
    """04_evaluate."""

    metrics_json: str
    metrics_csv: str
    predictions: dict[str, str]  # model label -> its predictions JSONL
    labels: list[str]
    untrained_key: str | None = None  # the params key of the rows training does not change: other runs may reuse them
    untrained_labels: list[str] = field(default_factory=list)
    reused: dict = field(default_factory=dict)  # label -> the run its rows were reused from


@dataclass(frozen=True)
class AnalysisOutputs(Recorded):
    """05_error_analysis."""

    report_html: str
    analysis_json: str


BY_STAGE: dict[str, type[Recorded]] = {
    "01_build_dataset": DatasetOutputs,
    "02_finetune": FinetuneOutputs,
    "03_quantize": QuantizeOutputs,
    "04_evaluate": EvaluateOutputs,
    "05_error_analysis": AnalysisOutputs,
}
