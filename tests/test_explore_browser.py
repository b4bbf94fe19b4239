"""The explorer in a real browser: `megapairs explore` started as its own process on a copy
of the demo run, driven by Playwright in headless Debian Chromium (the system browser,
installed by `.ci/run`). Pages, filters by channel, opens a pair, flags ten pairs; the flags
are in the run directory, and `megapairs export --exclude-flagged` then gives a dataset with
exactly ten rows fewer that validates. Screenshots are saved under the test's temp folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from explore_fixtures import explorer

from megapairs.cli import main as cli_main

CHROMIUM = Path(os.environ.get("MEGAPAIRS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLAGGED = 10


def browser_or_skip() -> None:
    """CI (MEGAPAIRS_REQUIRE_BROWSER=1, set by .ci/run) fails without a browser; a developer
    machine without Chromium skips."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing and os.environ.get("MEGAPAIRS_REQUIRE_BROWSER"):
        pytest.fail(f"the browser test needs {', '.join(missing)}")
    if missing:
        pytest.skip(f"no {', '.join(missing)}")


@pytest.fixture
def served_run(explore_demo_run: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A copy of the demo run and the address of `megapairs explore` serving it."""
    browser_or_skip()
    run = tmp_path / "run"
    shutil.copytree(explore_demo_run, run)
    with explorer(run, "--user", "browser-test") as (address, _):
        yield run, address


def test_browse_filter_open_flag_and_export_without_flagged(served_run, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    run, address = served_run
    shots = tmp_path / "screenshots"
    shots.mkdir()
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("response", lambda r: _failed_call(r, errors))
        page.goto(address)
        rows = page.locator("tr.pair-row")
        expect(rows.first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(shots / "pairs.png"))
        first_page = rows.first.get_attribute("data-pair-id")

        info = page.locator("#pager-info").inner_text()
        page.click("#pager-next")
        expect(page.locator("#pager-info")).not_to_have_text(info)
        assert rows.first.get_attribute("data-pair-id") != first_page
        assert "offset=" in page.url  # the view has its own URL

        page.check("#f-channel-caption")
        page.click("#f-apply")
        expect(page).to_have_url(re.compile(r"channel=caption"))
        expect(rows.first).to_be_visible()
        page.wait_for_load_state("networkidle")
        captions = [r.inner_text() for r in rows.all()]
        assert captions and all("caption" in text for text in captions)
        page.screenshot(path=str(shots / "filtered.png"))

        flagged = _flag_pairs(page, address, shots)
        page.click("#nav-overview")
        expect(page.locator("#overview-view svg.histogram").first).to_be_visible()
        page.screenshot(path=str(shots / "overview.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert len(list(shots.glob("*.png"))) >= 4

    events = [json.loads(f.read_text()) for f in (run / "flags").glob("*.json")]
    assert {e["pair_id"] for e in events} == set(flagged)
    assert {e["user"] for e in events} == {"browser-test"}
    _export_has_ten_rows_fewer(run)


def _failed_call(response, errors: list[str]) -> None:
    """An API answer >= 400, except images of rejected records that do not decode (the page
    shows a placeholder for those)."""
    if response.status >= 400 and "/api/image/" not in response.url:
        errors.append(f"{response.status} {response.url}")
    elif response.status >= 400:
        print(f"image {response.status}: {response.url}")


def _flag_pairs(page, address: str, shots: Path) -> list[str]:
    """Open ten pairs from the list and flag each as unrelated; return their ids."""
    from playwright.sync_api import expect

    page.goto(address + "#/pairs?limit=50")
    rows = page.locator("tr.pair-row")
    expect(rows.first).to_be_visible()
    ids = [rows.nth(i).get_attribute("data-pair-id") for i in range(0, 2 * FLAGGED, 2)]
    for number, pair_id in enumerate(ids):
        page.goto(f"{address}#/pairs?limit=50")
        page.locator(f'tr.pair-row[data-pair-id="{pair_id}"]').click()
        expect(page.locator("#pair-view")).to_be_visible()
        expect(page).to_have_url(re.compile(f"#/pair/{pair_id}"))
        page.select_option("#flag-reason", "unrelated_pair")
        page.click("#flag-button")
        expect(page.locator("#pair-flag-status")).to_contain_text("flagged")
        if number == 0:
            page.screenshot(path=str(shots / "pair.png"), full_page=True)
    return ids


def _export_has_ten_rows_fewer(run: Path) -> None:
    before = dataset_rows(run)
    assert cli_main(["export", "--run", str(run), "--exclude-flagged", "--quiet"]) == 0
    after = dataset_rows(run)
    assert after == before - FLAGGED
    assert cli_main(["validate", str(run / "dataset")]) == 0


def dataset_rows(run: Path) -> int:
    shards = sorted((run / "dataset").glob("part-*.parquet"))
    return sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
