"""Colab as its users meet it: the notebooks' one set-up cell, the install groups, and a Colab-like runtime.

The runtime test builds a fresh virtual environment holding what a Colab image has before the first cell runs
(torch, the local CPU build, plus transformers, pandas, matplotlib, ipywidgets and a Jupyter kernel) with
`google.colab` importable and imported at start, as Colab's kernel does; points TUNEBOOK_REPO at this repository;
and runs notebooks 01 and 02 from the clone the cell makes, on the smoke params, through papermill on that
environment's kernel. pip reaches the registry as usual.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from conftest import ROOT
from tunebook import colab
from tunebook.config import load_params

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# What a Colab image has before the first cell (a subset of its ~600 packages: the list, Jupyter's pieces, and
# the scientific stack and clients every Colab image carries), at the versions tested here.
COLAB_IMAGE = [
    "transformers",
    "pandas",
    "matplotlib",
    "ipywidgets",
    "ipykernel",
    "nbformat",
    "pyyaml",
    "pydantic",
    "packaging",
    "requests",
    "scipy",
    "scikit-learn",
    "protobuf",
    "pyarrow",
    "sentencepiece",
    "tabulate",
    "psutil",
    "aiohttp",
]
TORCH = "torch==2.13.0"
# The smoke run with its passages cut short: the runtime is under test here, not the model (a third of 02's time).
SHORT_PROMPTS = "data.passage_max_chars=40, model.max_seq_length=256"
FAKE_COLAB = {
    "__init__.py": "",
    "drive.py": "def mount(mountpoint, **kwargs):\n    import os\n    os.makedirs(os.path.join(mountpoint, 'MyDrive'), exist_ok=True)\n",
    "output.py": "enabled = []\n\ndef enable_custom_widget_manager():\n    enabled.append(True)\n",
}


def code_cells(notebook: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_the_one_setup_cell(notebook):
    cells = [c for c in code_cells(notebook) if "google.colab" in c]
    assert cells == [colab.setup_cell()], f"{notebook.name}: its Colab cell differs from tunebook.colab.setup_cell(); paste that function's text"
    text = notebook.read_text(encoding="utf-8")
    badge = re.search(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/([^/]+)/notebooks/" + re.escape(notebook.name), text)
    assert badge and f"https://github.com/{badge[1]}" == colab.REPOSITORY and badge[2] == colab.BRANCH


def test_requirements_txt_holds_every_group():
    listed = {
        canonicalize_name(re.split(r"[<>=!\[ ]", line)[0]) for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")
    }
    groups = ["core", "quantize", "gguf", "documents", "faq", "scale", "dev"]
    wanted = {canonicalize_name(re.split(r"[<>=!\[ ]", r)[0]) for g in groups for r in colab.group(g)}
    assert wanted <= listed, f"in pyproject.toml but not requirements.txt: {sorted(wanted - listed)}"


def test_a_stage_installs_only_the_groups_its_params_ask_for():
    smoke = load_params(ROOT / "params/smoke.yaml")
    assert all(colab.groups_for(smoke, s) == {} for s in ("01_build_dataset", "02_finetune", "05_error_analysis"))
    gguf = load_params(ROOT / "params/smoke.yaml", ["quantize.methods=[gguf_q4_k_m]"])
    assert list(colab.groups_for(gguf, "03_quantize")) == ["gguf"]
    assert list(colab.groups_for(load_params(ROOT / "params/faq_from_docs.yaml"), "01_build_dataset")) == ["documents"]
    assert "faq" in colab.groups_for(load_params(ROOT / "params/debian_faq.yaml"), "04_evaluate")


def test_drive_dir_moves_the_run_folders_to_drive_only_on_colab(monkeypatch):
    params = load_params(ROOT / "params/smoke.yaml", ["colab.drive_dir=MyDrive/tunebook"])
    assert params.run_dir == ROOT / "outputs" / "smoke"
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    params = load_params(ROOT / "params/smoke.yaml", ["colab.drive_dir=MyDrive/tunebook"])
    assert params.run_dir == Path("/content/drive/MyDrive/tunebook/smoke")


def pip_freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True).stdout
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(out)}


def colab_image(folder: Path) -> Path:
    """A fresh venv with the Colab image's basics and a google.colab that its interpreter imports at start."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH, *COLAB_IMAGE, "-c", str(ROOT / "constraints.txt")], check=True)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    package = site / "google" / "colab"  # no google/__init__.py: google is a namespace package (protobuf lives there too)
    package.mkdir(parents=True)
    for name, text in FAKE_COLAB.items():
        (package / name).write_text(text)
    (site / "colab_image.pth").write_text("import google.colab\n")
    return python


def test_colab_runtime_setup_then_01_and_02(tmp_path):
    python = colab_image(tmp_path / "image")
    before = pip_freeze(python)
    torch_record = next((python.parents[1] / "lib").glob("python3*/site-packages/torch-*.dist-info/RECORD"))
    torch_stamp = torch_record.stat().st_mtime_ns
    kernels = tmp_path / "jupyter" / "kernels" / "colab"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps({"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "colab", "language": "python"})
    )
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    home = tmp_path / "content" / "tunebook"
    pip_log = tmp_path / "pip.log"
    env = {
        **os.environ,
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "TUNEBOOK_REPO": str(ROOT),
        "TUNEBOOK_BRANCH": branch,
        "TUNEBOOK_HOME": str(home),
        "PIP_LOG": str(pip_log),
    }
    out = tmp_path / "outputs"
    timings = {}
    for stage in ("01_build_dataset", "02_finetune"):
        # The first cell does the install; 02's finds everything in place (a second notebook in the same runtime).
        notebook = (home / "notebooks" / f"{stage}.ipynb") if home.exists() else (ROOT / "notebooks" / f"{stage}.ipynb")
        started = time.time()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "papermill",
                str(notebook),
                str(tmp_path / f"{stage}.ipynb"),
                "-k",
                "colab",
                "--cwd",
                str(tmp_path),
                "-p",
                "params_path",
                str(home / "params" / "smoke.yaml"),
                "-y",
                f"overrides: [output_dir={out}, {SHORT_PROMPTS}]",
            ],
            check=False,
            env=env,
            capture_output=True,
            text=True,
        )
        timings[stage] = round(time.time() - started, 1)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    executed = json.loads((tmp_path / "01_build_dataset.ipynb").read_text())["cells"]
    setup_seconds = next(c for c in executed if "google.colab" in "".join(c["source"]))["metadata"]["papermill"]["duration"]
    cpu_runtime = pip_freeze(python)
    # On a GPU runtime the cell also installs Unsloth; Unsloth cannot run here, but its install can: the same call.
    started = time.time()
    subprocess.run(
        [str(python), "-c", f"import sys; sys.path.insert(0, {str(home / 'lib')!r}); from tunebook import colab; colab.install(unsloth=True)"],
        env=env,
        check=True,
    )
    unsloth_seconds = time.time() - started
    after = pip_freeze(python)
    added = sorted(set(after) - set(before))
    changed = sorted(n for n in before if after.get(n) != before[n])
    built = sorted(set(re.findall(r"Building wheel for (\S+)", pip_log.read_text()))) if pip_log.exists() else []
    report = {
        "packages_added_cpu_runtime": len(set(cpu_runtime) - set(before)),
        "packages_added_with_unsloth": len(added),
        "setup_cell_seconds": round(setup_seconds, 1),
        "unsloth_install_seconds": round(unsloth_seconds, 1),
        "versions_changed": {n: [before[n], after[n]] for n in changed},
        "source_builds": built,
        "notebook_seconds": timings,
        "added": added,
    }
    print(json.dumps(report, indent=1))
    assert after["torch"] == before["torch"] and torch_record.stat().st_mtime_ns == torch_stamp, "the set-up reinstalled torch"
    assert not built, report
    assert len(added) <= 60, report
    manifest = json.loads((out / "smoke" / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("01_build_dataset", "02_finetune")] == ["complete", "complete"]
    assert (out / "smoke" / "adapter").is_dir()
    assert yaml.safe_load((out / "smoke" / "params.yaml").read_text())["model"]["name"].startswith("embedded:")
