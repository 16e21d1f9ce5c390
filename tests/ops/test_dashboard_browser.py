"""The dashboard in real headless Chromium against the live service, with auth on."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SMOKE = {"data": {"image_size": 16, "subset": 256}, "training": {"epochs": 3, "batch_size": 32}}  # defaults but sizes

pytestmark = [pytest.mark.browser, pytest.mark.integration,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run does)")]


def js_number(page, selector: str, attr: str) -> float:
    return float(page.eval_on_selector(selector, f"e => e.dataset.{attr} || 0"))


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_dashboard_follows_and_cancels_jobs(live_service, live_token, browser, tmp_path):
    assert live_token, "the browser test runs with auth on"
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {live_token}"
    url = live_service.base_url
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # the page asks for the token once, refuses a bad one, keeps a good one in sessionStorage
    page.goto(url + "/")
    page.wait_for_selector("#token-panel:not([hidden])")
    page.fill("#token-input", "kiln_wrong")
    page.click("#token-form button")
    page.wait_for_function("document.getElementById('token-error').textContent.includes('refused')")
    page.fill("#token-input", live_token)
    page.click("#token-form button")
    page.wait_for_selector("#app:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('kiln.token')") == live_token

    # a job submitted through the API appears; its bar and curves fill in as it trains
    job = api.post(f"{url}/v1/jobs", json={"kind": "train", "config": SMOKE}, timeout=30).json()
    page.wait_for_selector(f"tr[data-job='{job['id']}']", timeout=15_000)
    page.click(f"tr[data-job='{job['id']}']")
    page.wait_for_function("Number(document.getElementById('job-bar').dataset.percent) > 0", timeout=120_000)
    page.wait_for_function("Number(document.getElementById('loss-chart').dataset.points) >= 2", timeout=120_000)
    first_points = js_number(page, "#loss-chart", "points")
    page.wait_for_function("document.getElementById('job-state').textContent === 'succeeded'", timeout=180_000)
    page.wait_for_function(f"Number(document.getElementById('loss-chart').dataset.points) > {first_points}"
                           " || Number(document.getElementById('loss-chart').dataset.points) >= 6",
                           timeout=15_000)
    assert js_number(page, "#job-bar", "percent") == pytest.approx(100.0)
    assert js_number(page, "#acc-chart", "points") >= 3
    page.wait_for_function("document.getElementById('log').textContent.length > 0", timeout=15_000)
    page.wait_for_selector("#artifacts a:has-text('checkpoints/best.pt')", timeout=15_000)

    # a registered model shows up with its version and alias
    api.post(f"{url}/v1/models", json={"name": "digits", "job_id": job["id"]}, timeout=60).raise_for_status()
    api.put(f"{url}/v1/models/digits/aliases/production", json={"version": 1}, timeout=30).raise_for_status()
    page.wait_for_selector("#models tr[data-model='digits']:has-text('production')", timeout=15_000)
    time.sleep(1.0)  # let the bar's CSS transition finish for the screenshot
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / "dashboard.png"), full_page=True)
    docs_png = ROOT / "docs" / "dashboard.png"
    if not docs_png.exists() or os.environ.get("KILN_UPDATE_SCREENSHOT") == "1":
        # the README's copy changes only on request, so a test run leaves the tree clean
        docs_png.parent.mkdir(exist_ok=True)
        shutil.copyfile(out / "dashboard.png", docs_png)

    # cancel from the page: a long job, cancelled while queued or running
    long_cfg = {**SMOKE, "training": {**SMOKE["training"], "epochs": 200}}
    victim = api.post(f"{url}/v1/jobs", json={"kind": "train", "config": long_cfg}, timeout=30).json()
    page.wait_for_selector(f"tr[data-job='{victim['id']}']", timeout=15_000)
    page.click(f"tr[data-job='{victim['id']}']")
    page.wait_for_function(f"document.getElementById('job-id').textContent === '{victim['id']}'")
    page.wait_for_selector("#cancel:not([disabled])")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('job-state').textContent === 'cancelled'", timeout=120_000)
    assert api.get(f"{url}/v1/jobs/{victim['id']}", timeout=30).json()["status"] == "cancelled"
    assert not errors, errors
