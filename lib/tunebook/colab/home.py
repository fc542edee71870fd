"""Where tunebook lives: the one setting that names its repository (owner, name, branch).

The Colab badges in the notebooks and README, the notebooks' set-up cell (which clones the repository on Colab), the
model cards' link and pyproject.toml's [project.urls] all come from OWNER, NAME and BRANCH below (tests/test_colab.py
compares them). Someone who publishes a fork changes these three lines, then runs `python -m tunebook home --write`,
(tunebook.colab.runtime.write_home), which rewrites the badges, the set-up cells, the Colab and repository links of README and
docs/, and [project.urls] to match.
"""

from __future__ import annotations

import re
from pathlib import Path

OWNER = "tunebook-sft"
NAME = "tunebook"
BRANCH = "main"

URL = f"https://github.com/{OWNER}/{NAME}"
ROOT = Path(__file__).resolve().parents[3]
# What a link to a notebook on Colab, or to a GitHub repository named tunebook, looks like in the files rewritten here.
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+?/notebooks/(\d\d_\w+\.ipynb)")
PROJECT_URLS = re.compile(r"(\[project\.urls\]\n)(?:[^\[\n][^\n]*\n)*")
REPOSITORY_LINK = re.compile(r"https://github\.com/[\w.-]+/tunebook\b(?!-)")


def colab_link(notebook: str) -> str:
    """The address that opens notebooks/<notebook> on Colab, straight from GitHub."""
    return f"https://colab.research.google.com/github/{OWNER}/{NAME}/blob/{BRANCH}/notebooks/{notebook}"


def project_urls() -> str:
    """pyproject.toml's [project.urls] section."""
    return f'[project.urls]\nHomepage = "{URL}"\nSource = "{URL}"\nIssues = "{URL}/issues"\nDocumentation = "{URL}/blob/{BRANCH}/docs/colab.md"\n'


def relinked(text: str) -> str:
    """A text with every Colab notebook link, and every link to a GitHub repository named tunebook (a clone line),
    pointing at this home."""
    return REPOSITORY_LINK.sub(URL, COLAB_LINK.sub(lambda m: colab_link(m[1]), text))
