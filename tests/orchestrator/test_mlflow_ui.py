"""The MLflow UI, for real: a sweep into a real `mlflow server` on 127.0.0.1, read back in
headless Chromium (Debian's `chromium`, driven by Playwright; no browser is downloaded).

Without Chromium the test is skipped, except in CI (CI=true), where it fails: `.ci/run`
installs it.
"""

import os
import re
import shutil

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless on a closed network: no GPU, no sandbox (root in CI), none of Chromium's background traffic.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FAST = ("debug=fast",)


@pytest.fixture
def browser_page():
    if not os.path.exists(CHROMIUM):
        message = f"no Chromium at {CHROMIUM}: apt-get install chromium"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


def test_the_sweep_its_trials_and_its_report_are_in_the_mlflow_ui(mlflow_server, run_cli, tiny_model_cfg,
                                                                   browser_page, tmp_path):
    proc = run_cli("run", "-m", "dtype=bf16,int8", *FAST, "sweep.name=ui", f"tracking.uri={mlflow_server.uri}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_id = re.search(r"^sweep (swp-[0-9a-f]{6}):", proc.stdout, re.M).group(1)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("ui")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'")[0]

    page = browser_page
    # The link the sweep prints opens the experiment's runs table (not the UI's default GenAI view).
    link = re.search(r"^mlflow ui: (\S+)$", proc.stdout, re.M).group(1)
    assert link.startswith(f"{mlflow_server.uri}/#/experiments/{experiment.experiment_id}/runs")
    page.goto(link)
    sweep_row = page.locator("[role=row]", has_text=sweep_id)
    sweep_row.wait_for(timeout=60_000)
    sweep_row.locator("button").first.click()  # expand the parent: its child runs are the trials
    for dtype in ("bf16", "int8"):
        page.locator("[role=row]", has_text=f"dtype={dtype}").first.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "runs.png")

    page.goto(f"{mlflow_server.uri}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts")
    page.get_by_text("report", exact=True).first.click()
    for name in ("comparison.html", "comparison.csv", "pareto_tiny-llama.png", "latency.png"):
        page.get_by_text(name, exact=True).wait_for(timeout=30_000)
    page.get_by_text("speedup_heatmap.png", exact=True).click()
    page.get_by_text("report/speedup_heatmap.png", exact=True).wait_for(timeout=30_000)  # the preview's title
    preview = page.locator("img[src^='blob:']").first  # the UI shows the downloaded PNG from a blob
    preview.wait_for(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=preview.element_handle())
    page.screenshot(path=tmp_path / "report.png")
    assert (tmp_path / "runs.png").stat().st_size > 10_000 and (tmp_path / "report.png").stat().st_size > 10_000
    print(f"screenshots: {tmp_path / 'runs.png'}, {tmp_path / 'report.png'}")
