"""Where a run lives on Google Colab: the runtime's own disk, where Google Drive is mounted in it, and whether this
is Colab. The schema reads them (Params moves output_dir to Drive there and keeps the rebuildable weights on the
runtime's disk: Params.weights_dir); the set-up cell mounts Drive there (tunebook.colab.runtime).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# A Colab runtime's own disk (lost with the runtime) and where Drive is mounted in it. TUNEBOOK_CONTENT moves both
# (the tests play several runtimes, each with a folder of its own).
COLAB_CONTENT = Path(os.environ.get("TUNEBOOK_CONTENT", "/content"))
DRIVE_MOUNT = str(COLAB_CONTENT / "drive")


def on_colab() -> bool:
    """Colab's kernel imports google.colab at start; a `!python ...` command in a cell runs where Colab's variables are set."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ
