"""/docs in real headless Chromium: Swagger UI from the wheel renders every operation, and a user
can authorize with a token and try a call."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.ops.test_dashboard_browser import ARGS, CHROMIUM

pytestmark = [pytest.mark.browser, pytest.mark.integration,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing")]


def test_swagger_ui_renders_and_tries_a_call_with_a_token(live_service, live_token):
    from playwright.sync_api import sync_playwright

    url = live_service.base_url
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    operations = sum(len(item) for item in spec["paths"].values())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            outside: list[str] = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
            page.goto(url + "/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert page.locator(".opblock").count() == operations
            assert "Unable to render" not in page.content()

            page.click("button.authorize")
            page.fill(".auth-container input", live_token)
            page.click(".auth-btn-wrapper button.authorize")
            page.click(".auth-btn-wrapper button.btn-done")

            block = page.locator(".opblock-get", has=page.locator(".opblock-summary-path[data-path='/v1/jobs']"))
            block.locator(".opblock-summary").first.click()
            block.locator(".try-out__btn").click()
            block.locator("button.execute").click()
            status = block.locator(".live-responses-table tr.response .response-col_status").first
            status.wait_for(timeout=30_000)
            assert status.inner_text().strip() == "200"
            assert not errors, errors
            assert not [u for u in outside if not u.startswith(("data:", "blob:"))], outside
        finally:
            browser.close()
