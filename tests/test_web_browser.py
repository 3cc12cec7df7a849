"""The operator console in a real browser: headless Chromium (Debian's ``chromium``, driven by the
``playwright`` package, which downloads no browser) against ``hyperct serve`` with the tiny test
model, DCMTK peers on loopback and HTTP basic auth.

What a person does: the studies page is open when ``storescu`` sends a study; the study appears and
moves on without a reload (server-sent events); its findings table and key image show; the PACS is
down, so the results' delivery fails and the outbox shows it; the PACS comes back, the retry button
is pressed, and the results arrive. No console error, no patient name in the node's log.
Screenshots go to ``$HYPERCT_WEB_OUT`` when set (else the test's temporary folder).

Part of ``make test``: ``make peers`` installs chromium with the DICOM peers (as root). A missing
chromium raises FileNotFoundError naming the fix, as a missing peer does: never a skip.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.app_fixtures import small_study
from tests.node_fixtures import NodeProcess, node_settings, study_files, wait_for
from tests.peers import LOOPBACK, StoreSCP, free_port, storescu

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(600)]

USER, PASSWORD = "operator", "browser-test-password"
#: Offline and locked down, as viewer/check.mjs starts it: no GPU, no first-run or background traffic.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
STEP_MS = 120_000


def require_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise FileNotFoundError("chromium is not installed: run `make peers` as root (or apt-get install chromium)")
    return found


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_console_shows_a_study_its_findings_and_retries_a_failed_delivery(tmp_path: Path, model_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = require_chromium()
    study = small_study(tmp_path / "study", seed=11)
    files = study_files(study)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, patient_name = str(first.StudyInstanceUID), str(first.PatientName)
    pacs_port, web_port = free_port(), free_port()
    settings = node_settings(
        tmp_path / "data", model_dir, destinations=[f"STORESCP@{LOOPBACK}:{pacs_port}"],
        retry={"max-attempts": 2, "initial-delay-s": 0.2, "factor": 1, "max-delay-s": 0.3},
        extra={"web": {"enabled": True, "port": web_port, "live-interval-s": 0.3,
                       "auth": {"username": USER, "password": PASSWORD}}},
    )  # fmt: skip
    web = f"http://{LOOPBACK}:{web_port}"
    shots = Path(os.environ.get("HYPERCT_WEB_OUT") or tmp_path / "screenshots")  # to look at the pages
    shots.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with NodeProcess(tmp_path, settings) as node, sync_playwright() as pw:
        wait_for(lambda: _ready(web), 60, "the web listener")
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=FLAGS, chromium_sandbox=False)
        context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                      viewport={"width": 1400, "height": 1000})  # fmt: skip
        page = context.new_page()
        page.set_default_timeout(STEP_MS)
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
        try:
            # 1. the studies page is open; a study arrives by C-STORE and shows up without a reload
            page.goto(f"{web}/studies")
            page.wait_for_selector("#live.on")  # the event stream is connected
            page.evaluate("window.__sameDocument = true")
            sent = storescu(LOOPBACK, node.port, "HYPERCT", files)
            assert sent.returncode == 0, sent.stderr[-2000:]
            row = f'tr[data-study="{study_uid}"]'
            page.wait_for_selector(row)
            # processed, then its delivery fails (the PACS is down): the row says so, still no reload
            page.wait_for_selector(f'{row}[data-state="failed"]')
            assert page.evaluate("window.__sameDocument === true"), "the page reloaded"

            # 2. the study's findings and key image
            page.click(f'{row} a[href="/studies/{study_uid}"]')
            page.wait_for_selector("#findings")
            present = page.locator("#findings tr.present")
            assert present.count() >= 1
            image = page.locator(".gallery img").first
            image.scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth === 640", arg=image.element_handle())
            page.screenshot(path=str(shots / "study.png"), full_page=True)

            # 3. the outbox shows the failed delivery
            page.goto(f"{web}/outbox")
            failed = page.locator('#outbox tr[data-state="failed"]')
            n_rows = failed.count()
            assert n_rows >= 2, page.inner_text("#outbox")  # SR, SEG, maps, text SR: each failed, with why
            assert all(failed.nth(i).locator("td.text").inner_text().strip() for i in range(n_rows))
            page.screenshot(path=str(shots / "outbox.png"), full_page=True)

            # 4. the PACS comes back; retry; the results arrive and the job page shows them sent
            with StoreSCP(tmp_path / "pacs", ae_title="STORESCP", port=pacs_port) as scp:
                page.locator("#outbox button.retry").first.click()
                page.wait_for_selector("p.message")
                assert "re-queued" in page.inner_text("p.message")
                page.wait_for_function(
                    "() => { const rows = document.querySelectorAll('#job-outbox tr[data-state]');"
                    " return rows.length > 0 && [...rows].every(r => r.dataset.state === 'sent'); }"
                )
                assert page.inner_text("#job-state") == "done"
                wait_for(lambda: len(scp.files()) >= n_rows, 60, "the results at the PACS")
                page.screenshot(path=str(shots / "job.png"), full_page=True)
            assert node.study_states()[study_uid] == "done"
            page.goto(f"{web}/studies")
            page.wait_for_selector(f'{row}[data-state="done"]')
        except BaseException:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            print(f"page {page.url}:\n{page.inner_text('body')[-3000:]}\n\nnode log:\n{node.log_text()[-4000:]}")
            raise
        finally:
            context.close()
            browser.close()
    assert problems == [], problems
    log = node.log_text()
    assert patient_name not in log and patient_name.replace("^", " ") not in log
    assert "retried: " in log
