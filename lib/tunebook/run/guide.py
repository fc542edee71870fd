"""What a stage wrote, as a table: the last cell of each notebook, read from the stage's record in the manifest
(tunebook.run.outputs), so it lists what this run really has, where it lies and how large it is."""

from __future__ import annotations

from pathlib import Path

from tunebook.run.folder import Run

# Record fields that hold token ids, examples or a tracker, not files.
NOT_PATHS = {"name", "trained_prompt", "loss_example", "tracker", "table", "lengths"}


def recorded_paths(value, name: str = "") -> list[tuple[str, str]]:
    """(field, path) for every path in a stage's record: nested dicts name their keys (predictions.base), a list's
    records their `name` (variants.gguf_q4_k_m)."""
    if isinstance(value, dict):
        if isinstance(value.get("name"), str):  # one of a list of records (03's copies)
            name = f"{name}.{value['name']}"
        return [pair for key, inner in value.items() if key not in NOT_PATHS for pair in recorded_paths(inner, f"{name}.{key}" if name else key)]
    if isinstance(value, list):
        return [pair for inner in value for pair in recorded_paths(inner, name)]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return [(name.removesuffix(".path"), value)]
    return []


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def wrote(run: Run, stage: str):
    """A table of what `stage` wrote for this run: each file or folder its record names that is on this machine, its
    place (in the run folder, or elsewhere: on Colab the weights stay on the runtime's own disk) and its size in MB."""
    import pandas as pd

    rows, seen = [], set()
    for field, value in recorded_paths(run.outputs_of(stage).as_json()):
        path = Path(value)
        if path in seen or not path.exists():
            continue
        seen.add(path)
        inside = path.resolve().is_relative_to(run.dir.resolve())
        shown = str(path.resolve().relative_to(run.dir.resolve())) if inside else str(path)
        rows.append(
            {"what": field, "path": shown + ("/" if path.is_dir() else ""), "where": "run folder" if inside else "weights folder", "size_mb": size_mb(path)}
        )
    print(f"Run folder: {run.dir}")
    return pd.DataFrame(rows, columns=["what", "path", "where", "size_mb"]).set_index("what")
