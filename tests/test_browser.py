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
from tunebook.analysis import gold_in_passages, load_predictions, report_html
from tunebook.runs import open_run

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
    page.select_option("#f-category", "wrong")
    page.locator("#filters").scroll_into_view_if_needed()
    page.screenshot(path=run_dir / "report_finetuned.png")  # the viewport: a full page of every answer is huge
    assert (run_dir / "report_finetuned.png").stat().st_size > 10_000


def test_script_in_a_prediction_is_shown_as_text_never_run(browser, tmp_path):
    attack = "<script>window.pwned = 1</script>"
    row = {
        "id": "1", "question": "Who?", "gold_answers": ["Ada"], "prediction": attack, "category": "wrong", "exact_match": 0,
        "passages": ['<img src=x onerror="window.pwned = 2"> Ada wrote it.'], "output": attack,
    }
    page_file = tmp_path / "report.html"
    page_file.write_text(report_html("attack", {"finetuned": [row]}, [{"model": "finetuned", "wrong": 1}], None), encoding="utf-8")
    page = browser.new_page()
    page.goto(page_file.as_uri())
    page.wait_for_timeout(300)  # time for an injected handler to fire, were there one
    assert page.evaluate("window.pwned") is None
    assert page.locator(".pred").first.inner_text() == attack
    assert shown(page) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on loopback (no token, no browser of its own), serving tmp_path, with its app object exposed."""
    port = free_port()
    settings = tmp_path / ".lab"
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ServerApp.ip=127.0.0.1",
        "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={settings / 'user'}", f"--LabApp.workspaces_dir={settings / 'workspaces'}",
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


def test_notebook_05_renders_its_browser_in_jupyterlab(smoke_run, browser, jupyterlab, tmp_path):
    run_dir, _ = smoke_run
    notebook = tmp_path / "05_error_analysis.ipynb"
    # papermill only writes the parameters cell here (pointing at the smoke run); JupyterLab runs the notebook.
    prepare = [sys.executable, "-m", "papermill", "--prepare-only", str(ROOT / "notebooks/05_error_analysis.ipynb"), str(notebook), "-p", "params_path", str(run_dir / "params.yaml")]
    subprocess.run(prepare, check=True, capture_output=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{jupyterlab}/lab/tree/{notebook.name}")
    page.wait_for_function("window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'", timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    previous = page.get_by_role("button", name="◀ previous")
    previous.wait_for(timeout=120_000)
    item = page.locator(".jp-OutputArea .item").first
    item.wait_for()
    assert "Q:" in item.inner_text() and "Prediction:" in item.inner_text()
    assert page.get_by_role("button", name="next ▶").is_visible()
    counter = page.locator(".jp-OutputArea").get_by_text(re.compile(r"^1 of \d+$"))
    counter.wait_for()
    if counter.inner_text() != "1 of 1":
        page.get_by_role("button", name="next ▶").click()
        page.locator(".jp-OutputArea").get_by_text(re.compile(r"^2 of \d+$")).wait_for()
    page.get_by_role("button", name="also acceptable").click()
    page.get_by_role("button", name="export marks").click()
    page.locator(".jp-OutputArea").get_by_text(re.compile(r"^\d+ mark\(s\) saved to ")).wait_for()
    marks = [json.loads(line) for line in (run_dir / "relabels.jsonl").read_text().splitlines()]
    assert {"model": "base", "mark": "also_acceptable"}.items() <= marks[-1].items()
    item.scroll_into_view_if_needed()
    page.screenshot(path=run_dir / "jupyterlab_05.png")
    assert (run_dir / "jupyterlab_05.png").stat().st_size > 10_000
