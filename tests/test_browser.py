"""The error analysis as a person uses it, in a real browser: Debian's Chromium (`make test` installs it) driven by
Playwright, on the session's finished smoke run. Screenshots land in the run folder."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from playwright.sync_api import sync_playwright

from conftest import ROOT
from tunebook.analysis.analysis import categorize, confusion_matrix, is_right, load_predictions
from tunebook.analysis.report import gold_in_passages, report_html
from tunebook.run.folder import open_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package (apt-get install chromium).")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no user namespaces
        yield chromium
        chromium.close()


def shown(page) -> int:
    count = int(page.inner_text("#shown").split()[0])
    assert count == page.locator(".item:visible").count()  # the counter says what the page shows
    return count


def test_report_filters_match_the_metrics(smoke_run, browser):
    run_dir, _ = smoke_run
    metrics = {r["model"]: r for r in json.loads((run_dir / "metrics.json").read_text())}
    right = {m: round(r["exact_match"] * r["n"]) for m, r in metrics.items()}
    page = browser.new_page()
    page.goto((run_dir / "report.html").as_uri())
    assert shown(page) == sum(r["n"] for r in metrics.values()) - sum(right.values())  # opens on every wrong answer
    page.select_option("#f-model", "finetuned")
    assert shown(page) == metrics["finetuned"]["n"] - right["finetuned"]
    page.select_option("#f-category", "correct")
    assert shown(page) == right["finetuned"]
    page.select_option("#f-category", "")
    assert shown(page) == metrics["finetuned"]["n"]
    question = json.loads((run_dir / "predictions" / "finetuned.jsonl").read_text().splitlines()[0])["question"]
    page.fill("#f-search", question)
    assert shown(page) >= 1 and question in page.locator(".item:visible").first.inner_text()
    page.fill("#f-search", "no answer contains this 7c1d")
    assert shown(page) == 0
    page.fill("#f-search", "")
    page.select_option("#f-category", "miss")
    rows = load_predictions(open_run(run_dir / "params.yaml"))["finetuned"]
    assert shown(page) == sum(gold_in_passages(r) is False for r in rows)
    page.fill("#f-search", "")
    page.select_option("#f-category", "all_wrong")
    page.evaluate("document.activeElement.blur()")  # keys typed into a focused filter stay there
    page.keyboard.press("j")
    page.keyboard.press("j")  # j / k step through the shown answers
    assert page.locator(".item.current").count() == 1 and page.locator(".item:visible").nth(1).get_attribute("class") == "item current"
    page.locator("#filters").scroll_into_view_if_needed()
    page.screenshot(path=run_dir / "report_finetuned.png")  # the viewport: a full page of every answer is huge
    assert (run_dir / "report_finetuned.png").stat().st_size > 10_000


def test_script_in_a_prediction_is_shown_as_text_never_run(browser, tmp_path):
    attack = "<script>window.pwned = 1</script>"
    row = {
        "id": "1",
        "question": "Who?",
        "gold_answers": ["Ada"],
        "prediction": attack,
        "category": "wrong",
        "exact_match": 0,
        "passages": ['<img src=x onerror="window.pwned = 2"> Ada wrote it.'],
        "output": attack,
    }
    page_file = tmp_path / "report.html"
    page_file.write_text(report_html("attack", {"finetuned": [row]}, [{"model": "finetuned", "wrong": 1}], None), encoding="utf-8")
    page = browser.new_page()
    page.goto(page_file.as_uri())
    page.wait_for_timeout(300)  # time for an injected handler to fire, were there one
    assert page.evaluate("window.pwned") is None
    assert page.locator(".pred").first.inner_text() == attack
    assert shown(page) == 1


def report_runs(smoke_run, recipe_runs) -> dict:
    return {"smoke": smoke_run[0], **recipe_runs}


@pytest.mark.parametrize("name", ["smoke", "livedoor_genre", "hotpotqa_raft"])
def test_report_category_counts_equal_the_predictions_files(name, smoke_run, recipe_runs, browser):
    """For each recipe's metric (EM/F1 QA, classification, HotpotQA), every model x category count the page shows
    equals a count made here from predictions/*.jsonl."""
    run_dir = report_runs(smoke_run, recipe_runs)[name]
    page = browser.new_page()
    page.goto((run_dir / "report.html").as_uri())
    page.select_option("#f-category", "")
    for file in sorted((run_dir / "predictions").glob("*.jsonl")):
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
        expected = {}
        for r in rows:
            category = "correct" if is_right(r) else categorize(r["prediction"], r["gold_answers"])
            expected[category] = expected.get(category, 0) + 1
        page.select_option("#f-model", file.stem)
        for category in ("correct", "empty", "normalization", "too_verbose", "truncated", "wrong"):
            page.select_option("#f-category", category)
            assert shown(page) == expected.get(category, 0), (file.stem, category)
    counts = json.loads((run_dir / "analysis.json").read_text())["category_counts"]
    assert sum(r["n"] for r in counts) == sum(len(f.read_text().splitlines()) for f in (run_dir / "predictions").glob("*.jsonl"))


def test_report_confusion_cells_open_their_answers(recipe_runs, browser):
    run_dir = recipe_runs["livedoor_genre"]
    labels = json.loads((run_dir / "manifest.json").read_text())["stages"]["04_evaluate"]["outputs"]["labels"]
    rows = [json.loads(line) for line in (run_dir / "predictions" / "finetuned.jsonl").read_text().splitlines()]
    counts = confusion_matrix(rows, labels)
    gold, predicted = next((g, c) for g, row in counts.items() for c, n in row.items() if n and c != g)  # a confusion
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(run_dir.joinpath("report.html").as_uri())
    page.locator(f'td.cell[data-model="finetuned"][data-gold="{gold}"][data-pred="{predicted}"]').click()
    assert shown(page) == counts[gold][predicted]
    assert page.inner_text("#f-cell-text") == f"{gold} → {predicted}"
    for item in page.locator(".item:visible").all():
        assert (item.get_attribute("data-model"), item.get_attribute("data-gold"), item.get_attribute("data-pred")) == ("finetuned", gold, predicted)
    page.screenshot(path=run_dir / "report_confusion_cell.png")
    page.click("#f-cell-clear")
    assert shown(page) == len(rows) and page.locator("#f-cell").is_hidden()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on loopback (no token, no browser of its own), serving tmp_path, with its app object exposed."""
    port = free_port()
    settings = tmp_path / ".lab"
    # Every cell attached and rendered: by default JupyterLab skips rendering the cells out of view (CSS
    # content-visibility), and an answer browser below the fold then reads as empty text.
    tracker = settings / "user" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        f"--port={port}",
        "--ServerApp.ip=127.0.0.1",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={tmp_path}",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={settings / 'user'}",
        f"--LabApp.workspaces_dir={settings / 'workspaces'}",
    ]
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(f"{url}/api/status", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def open_notebook_05(browser, jupyterlab, tmp_path, run_dir):
    """Notebook 05 for run_dir, opened and run in JupyterLab; returns the page once its answer browser shows."""
    notebook = tmp_path / f"05_{run_dir.name}.ipynb"
    # papermill only writes the parameters cell here (pointing at the run); JupyterLab runs the notebook.
    prepare = [
        sys.executable,
        "-m",
        "papermill",
        "--prepare-only",
        str(ROOT / "notebooks/05_error_analysis.ipynb"),
        str(notebook),
        "-p",
        "params_path",
        str(run_dir / "params.yaml"),
    ]
    subprocess.run(prepare, check=True, capture_output=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{jupyterlab}/lab/tree/{notebook.name}")
    page.wait_for_function("window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'", timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.get_by_role("button", name="◀ previous").wait_for(timeout=120_000)
    item = page.locator(".jp-OutputArea .item").first
    item.wait_for()
    item.scroll_into_view_if_needed()  # as a user scrolls to the browser
    return page


def position(page) -> str:
    """The browser's "i of n" counter, once it shows."""
    counter = page.locator(".jp-OutputArea .widget-label").filter(has_text=re.compile(r"^(\d+ of \d+|no answers match)$"))
    counter.wait_for()
    return counter.inner_text()


def wait_for_position(page, text: str) -> None:
    page.locator(".jp-OutputArea .widget-label").filter(has_text=re.compile(f"^{text}$")).wait_for(timeout=10_000)


def test_notebook_05_renders_its_browser_in_jupyterlab(smoke_run, browser, jupyterlab, tmp_path):
    run_dir, _ = smoke_run
    page = open_notebook_05(browser, jupyterlab, tmp_path, run_dir)
    item = page.locator(".jp-OutputArea .item").first
    assert "Q:" in item.inner_text() and "Prediction:" in item.inner_text()
    assert page.get_by_role("button", name="next ▶").is_visible()
    total = int(position(page).split(" of ")[1])
    assert position(page) == f"1 of {total}"
    page.get_by_role("button", name="next ▶").click()
    wait_for_position(page, f"{2 % total or total} of {total}")
    item.hover()  # the answer takes the keyboard while the pointer is over it
    page.keyboard.press("ArrowRight")
    wait_for_position(page, f"{3 % total or total} of {total}")
    page.keyboard.press("k")
    wait_for_position(page, f"{2 % total or total} of {total}")
    page.get_by_role("button", name="also acceptable").click()
    page.locator(".jp-OutputArea").get_by_text(re.compile(r"^marked: also acceptable \(\d+ mark\(s\) in ")).wait_for()
    marks = [json.loads(line) for line in (run_dir / "relabels.jsonl").read_text().splitlines()]
    assert {"model": "base", "mark": "also_acceptable"}.items() <= marks[-1].items()  # saved at once
    item.scroll_into_view_if_needed()
    page.screenshot(path=run_dir / "jupyterlab_05.png")
    assert (run_dir / "jupyterlab_05.png").stat().st_size > 10_000


def test_notebook_05_picks_runs_and_opens_confusion_cells(smoke_run, recipe_runs, browser, jupyterlab, tmp_path):
    run_dir = recipe_runs["livedoor_genre"]
    page = open_notebook_05(browser, jupyterlab, tmp_path, run_dir)
    labels = json.loads((run_dir / "manifest.json").read_text())["stages"]["04_evaluate"]["outputs"]["labels"]
    rows = [json.loads(line) for line in (run_dir / "predictions" / "base.jsonl").read_text().splitlines()]
    counts = confusion_matrix(rows, labels)
    gold, predicted = next((g, c) for g, row in counts.items() for c, n in row.items() if n)
    page.locator(f'.jp-OutputArea button[title="{gold} → {predicted}"]').click()
    wait_for_position(page, f"1 of {counts[gold][predicted]}")
    page.locator(".jp-OutputArea").get_by_text(f"cell: {gold} → {predicted}").wait_for()
    page.locator(".jp-OutputArea .item").first.scroll_into_view_if_needed()
    page.screenshot(path=run_dir / "jupyterlab_05_confusion_cell.png")
    runs = page.locator(".jp-OutputArea .widget-dropdown select").first  # the run picker lists every finished run
    assert {"smoke", "livedoor_genre", "hotpotqa_raft"} <= set(runs.locator("option").all_inner_texts())
    runs.select_option("smoke")
    page.locator(".jp-OutputArea .item").get_by_text("Q:").first.wait_for()
    wait_for_position(page, rf"1 of {sum(not is_right(json.loads(line)) for line in (smoke_run[0] / 'predictions' / 'base.jsonl').read_text().splitlines())}")
