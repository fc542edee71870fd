import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNEBOOK_SHARED", ROOT.parent / "shared"))


@pytest.fixture
def shared_datasets() -> Path:
    """../shared/datasets beside the checkout (real public samples); tests that need it skip without it."""
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip(f"{path} is not present")
    return path


@pytest.fixture
def write_params(tmp_path):
    """Write a params YAML into tmp_path and return its path."""

    def write(text: str, name: str = "p.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """params/smoke.yaml through the CLI, all five notebooks, once per test session: (run folder, completed process)."""
    out = tmp_path_factory.mktemp("outputs")
    command = [sys.executable, "-m", "tunebook", "run", "params/smoke.yaml", "--set", f"output_dir={out}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "smoke", result
