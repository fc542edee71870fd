"""Compare runs: one table of the params that differ, the metrics and the training losses, with the best value of
each metric marked, and the runs' loss curves overlaid in one plot.

    python -m tunebook compare outputs/sweep_lora [outputs/default ...] [--model finetuned] [--sort f1]

In a notebook, `compare.widget(folder)` shows the same table, sortable by any column, and the plot (05 does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from tunebook.errors import TunebookError
from tunebook.metrics import SUMMARY_KEYS
from tunebook.run.folder import Run, is_run_folder
from tunebook.run.keys import WHERE_KEYS, flatten, is_under
from tunebook.training.train import loss_curves

# The judge's mean rubric score (evaluate.judge, 1-5) and a self-improvement round's kept share (rounds.json) too.
METRICS = [*dict.fromkeys(k for keys in SUMMARY_KEYS.values() for k in keys), "judge_score", "kept_share"]
# Where a lower value is the better one; every other metric column is better higher.
LOWER_IS_BETTER = {"invalid_rate", "eval_loss", "train_loss", "train_seconds"}
TRAINING = ["eval_loss", "train_loss", "train_seconds"]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders (with a manifest.json) from run folders and folders of runs (in a sweep's own order)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "manifest.json").is_file():
            found.append(path.resolve())
            continue
        if not path.is_dir():
            raise TunebookError(f"{path}: no such folder. Give run folders (outputs/<run>) or a folder of runs (a sweep's).")
        children = [c.resolve() for c in sorted(path.iterdir()) if is_run_folder(c)]
        state = next((f for f in (path / "sweep.json", path / "rounds.json") if f.is_file()), None)
        if state:
            order = json.loads(state.read_text(encoding="utf-8")).get("order", [])
            children.sort(key=lambda c: order.index(c.name) if c.name in order else len(order))
        if not children:
            raise TunebookError(f"{path}: neither a run folder (no manifest.json) nor a folder of runs.")
        found += children
    return list(dict.fromkeys(found))


def comparison(run_dirs: list[Path], model: str = "finetuned") -> pd.DataFrame:
    """One row per run (per run and model with model="all"): run, the params that differ between the runs, the
    metrics of 04 and the losses and time of 02. Runs without a finished 04 (or without that model) are left out,
    with a note."""
    rows, params, left_out = [], {}, []
    for folder in run_dirs:
        run = Run.load(folder)
        status = run.status("04_evaluate")
        if status != "complete":
            left_out.append(f"{folder.name} (04_evaluate {'not run' if status == 'missing' else status})")
            continue
        metrics = json.loads(Path(run.outputs_of("04_evaluate").metrics_json).read_text(encoding="utf-8"))
        chosen = [m for m in metrics if model in ("all", m["model"])]
        if not chosen:
            left_out.append(f"{folder.name} (no '{model}' row; it has {', '.join(m['model'] for m in metrics)})")
            continue
        flat = flatten(run.params.model_dump(mode="json"))
        params[folder.name] = {k: v for k, v in flat.items() if not is_under(k, WHERE_KEYS)}
        training = _training(run)
        kept = _kept_share(folder)
        for m in chosen:
            row = {"run": folder.name, **({"model": m["model"]} if model == "all" else {})}
            row.update({k: m[k] for k in METRICS if k in m})
            row.update(kept if m["model"] != "base" else {})
            rows.append({**row, **(training if m["model"] != "base" else {})})
    if left_out:
        print("Left out: " + "; ".join(left_out))
    if not rows:
        raise TunebookError(f"No run to compare: {'; '.join(left_out)}.")
    keys = list(dict.fromkeys(k for p in params.values() for k in p))
    differing = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in params.values()}) > 1]
    table = pd.DataFrame(rows)
    for position, key in enumerate(differing, start=1 + (model == "all")):
        table.insert(position, key, [_shown(params[r].get(key)) for r in table["run"]])
    metric_columns = [c for c in [*METRICS, *TRAINING] if c in table]
    return table[[c for c in table if c not in metric_columns] + metric_columns]


def _kept_share(folder: Path) -> dict:
    """A self-improvement round's share of questions with an answer kept for training (its rounds.json record)."""
    state = folder.parent / "rounds.json"
    if not state.is_file():
        return {}
    record = json.loads(state.read_text(encoding="utf-8")).get("runs", {}).get(folder.name, {})
    return {"kept_share": record["kept_share"]} if record.get("kept_share") is not None else {}


def _training(run: Run) -> dict:
    """Final eval loss, mean train loss and train time of a finished 02."""
    if run.status("02_finetune") != "complete":
        return {}
    finetuned = run.outputs_of("02_finetune")
    log = Path(finetuned.train_log)
    _, evals = loss_curves(json.loads(log.read_text(encoding="utf-8"))) if log.is_file() else ([], [])
    return {"eval_loss": round(evals[-1][1], 4) if evals else None, "train_loss": finetuned.train_loss, "train_seconds": finetuned.train_seconds}


def _shown(value):
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def best_rows(table: pd.DataFrame) -> dict[str, list[int]]:
    """{metric column: row positions holding its best value}; a column where every run ties is left out."""
    best = {}
    for column in [c for c in [*METRICS, *TRAINING] if c in table]:
        values = pd.to_numeric(table[column], errors="coerce")
        if values.nunique() < 2:
            continue
        target = values.min() if column in LOWER_IS_BETTER else values.max()
        best[column] = [i for i, v in enumerate(values) if v == target]
    return best


def sort_table(table: pd.DataFrame, column: str | None = None, best_first: bool = True) -> pd.DataFrame:
    """Sorted by `column` (default: the first metric), best first for metrics, ascending for params."""
    column = column or _default_sort(table)
    if column not in table:
        raise TunebookError(f"--sort {column}: no such column. Columns: {', '.join(table.columns)}.")
    ascending = column in LOWER_IS_BETTER if column in [*METRICS, *TRAINING] else True
    return table.sort_values(column, ascending=ascending if best_first else not ascending, kind="stable", key=_sortable).reset_index(drop=True)


def _sortable(values: pd.Series) -> pd.Series:
    return values if pd.api.types.is_numeric_dtype(values) else values.astype(str)


def to_markdown(table: pd.DataFrame) -> str:
    """The table with each metric's best value in bold, then a line naming the best run per metric."""
    best = best_rows(table)
    shown = table.astype(object).where(table.notna(), "").map(_one_line).astype(object)
    for column, positions in best.items():
        for i in positions:
            shown.iloc[i, shown.columns.get_loc(column)] = f"**{table[column].iloc[i]}**"
    lines = [shown.to_markdown(index=False), ""]
    name = (table["run"] + (" / " + table["model"] if "model" in table else "")).tolist()
    lines += [f"Best {column}: {', '.join(name[i] for i in positions)} ({table[column].iloc[positions[0]]})" for column, positions in best.items()]
    return "\n".join(lines).rstrip()


def _one_line(value, limit: int = 80):
    """A cell that keeps a markdown row on one line: no line breaks or pipes, long texts (prompts) cut; the CSV keeps them whole."""
    if not isinstance(value, str):
        return value
    text = " ".join(value.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_losses(run_dirs: list[Path]):
    """Training loss (lines) and eval loss (dashed, dots) of every run with a finished 02, one colour per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, folder in enumerate(run_dirs):
        run = Run.load(folder)
        if run.status("02_finetune") != "complete" or not (log := Path(run.outputs_of("02_finetune").train_log)).is_file():
            continue
        train, evals = loss_curves(json.loads(log.read_text(encoding="utf-8")))
        colour = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train), color=colour, alpha=0.8, label=f"{folder.name} train")
        if evals:
            ax.plot(*zip(*evals), color=colour, linestyle="--", marker="o", label=f"{folder.name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def write_comparison(run_dirs: list[Path], out_dir: Path, model: str = "finetuned", sort: str | None = None) -> pd.DataFrame:
    """comparison.csv, comparison.md and loss_curves.png in out_dir; prints the markdown table."""
    import matplotlib.pyplot as plt

    table = sort_table(comparison(run_dirs, model), sort)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv", index=False)
    markdown = to_markdown(table)
    (out_dir / "comparison.md").write_text(markdown + "\n", encoding="utf-8")
    fig = plot_losses(run_dirs)
    fig.savefig(out_dir / "loss_curves.png", dpi=120)
    plt.close(fig)
    print(f"\n{markdown}\n\nWritten: {out_dir / 'comparison.csv'}, {out_dir / 'comparison.md'}, {out_dir / 'loss_curves.png'}")
    return table


def compare_command(paths: list[str], model: str, sort: str | None, out: str | None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    run_dirs = find_runs(paths)
    # Default: the folder that holds the runs (a sweep's own folder for its runs).
    out_dir = Path(out) if out else Path(os.path.commonpath([d.parent for d in run_dirs]))
    write_comparison(run_dirs, out_dir, model, sort)
    return 0


def widget(*paths: str | Path, model: str = "finetuned"):
    """The comparison table (best value per metric highlighted) with a sort picker, and the overlaid loss curves."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    run_dirs = find_runs(list(paths))
    table = comparison(run_dirs, model)
    sort = w.Dropdown(options=list(table.columns), value=_default_sort(table), description="sort by")
    best_first = w.ToggleButton(value=True, description="best first", tooltip="metrics: best first; params: ascending")
    shown, plot = w.Output(), w.Output()

    def show(*_):
        with shown:
            shown.clear_output(wait=True)
            display(_styled(sort_table(table, sort.value, best_first.value)))

    sort.observe(show, "value")
    best_first.observe(show, "value")
    show()
    with plot:
        fig = plot_losses(run_dirs)
        display(fig)
        plt.close(fig)
    return w.VBox([w.HBox([sort, best_first]), shown, plot])


def _default_sort(table: pd.DataFrame) -> str:
    metrics = [c for c in METRICS if c in table]
    return metrics[0] if metrics else "run"


def _styled(table: pd.DataFrame):
    best = best_rows(table)

    def mark(column: pd.Series) -> list[str]:
        return ["font-weight: bold; background-color: #d4f4dd" if i in best.get(column.name, []) else "" for i in range(len(column))]

    numeric = [c for c in table if pd.api.types.is_float_dtype(table[c])]
    return table.style.apply(mark).format("{:.4f}", subset=numeric, na_rep="").hide(axis="index")
