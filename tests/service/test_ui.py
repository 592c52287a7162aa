"""The web UI in a real headless Chromium (Debian's build, driven by Playwright): log in with the bootstrap token,
edit a fact through the form and see the answer before and after, look at the KG neighbourhood, roll back."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("playwright", reason="pip install playwright (.ci/run installs it)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="apt-get install chromium (.ci/run does)")

from playwright.sync_api import expect, sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(params=["sqlite"])  # the UI does not depend on the database
def db_url(request, tmp_path):
    return f"sqlite:///{tmp_path}/kedit.db"


def test_ui_edit_kg_and_rollback_in_chromium(harness, live_server):
    with live_server(harness) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            expect(page.locator("#health")).to_contain_text("method grace")
            page.fill("#token", harness.token_file.read_text().strip())
            page.click("#save-token")
            expect(page.locator("#whoami")).to_have_text("admin (admin)")

            page.fill("#ask-prompt", "Babra Gaiskim was born in")
            page.fill("#edit-subject", "Babra Gaiskim")
            page.fill("#edit-relation", "born_in")
            page.fill("#edit-object", "Baica")
            page.click("#edit-btn")
            expect(page.locator("#status")).to_contain_text("committed")
            before = page.locator("#answer-before").inner_text()
            expect(page.locator("#answer-now")).to_contain_text("Baica")
            assert "Baica" not in before and before.strip()
            row = page.locator("#ledger tbody tr").first
            expect(row).to_contain_text("committed")
            expect(row).to_contain_text("admin")

            page.fill("#kg-entity", "Babra Gaiskim")
            page.click("#kg-btn")
            expect(page.locator("#kg-table")).to_contain_text("Baica")

            row.locator("button.rollback").click()
            expect(page.locator("#ledger tbody tr").first).to_contain_text("rolled_back")
            expect(page.locator("#answer-now")).to_have_text(before)

            page.fill("#token", "kedit_wrong")
            page.click("#save-token")
            expect(page.locator("#status")).to_contain_text("401")
        finally:
            browser.close()
