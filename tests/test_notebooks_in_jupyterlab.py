"""The ranking explorer in a real JupyterLab, driven by a real browser.

Starts JupyterLab on a free loopback port with a temporary workspace and settings, opens notebook
05 in headless Chromium through Playwright (the system's Chromium, e.g. Debian's ``chromium``
package; Playwright's own browser download is never used), runs every cell, checks that the
widgets render without errors, clicks the next-query button and the level toggle of the explorer
and of the two-model comparison explorer, checks that the shown query and level change, and saves
a screenshot as ``results/jupyterlab_05_ranking_explorer.png``.

Run it alone with ``.venv/bin/python -m pytest tests/test_notebooks_in_jupyterlab.py`` (it needs
Chromium: ``apt-get install chromium``, or set ``HAPKIT_CHROMIUM`` to a Chromium / Chrome binary).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "05_ranking_explorer.ipynb"
CHROMIUM = os.environ.get("HAPKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
    or shutil.which("google-chrome")

# CI installs Chromium and sets HAPKIT_REQUIRE_BROWSER=1, so that a missing browser fails there
# instead of silently skipping the only test that runs the widgets in a real front end.
NO_BROWSER = "no Chromium found (apt-get install chromium, or set HAPKIT_CHROMIUM)"
if CHROMIUM is None and os.environ.get("HAPKIT_REQUIRE_BROWSER"):
    raise RuntimeError(NO_BROWSER)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def jupyterlab(tmp_path):
    """A JupyterLab server on loopback over a copy of the notebook, with its own settings."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK)
    # every cell rendered (no windowing), so that the page shows the whole notebook
    tracker = tmp_path / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    port, token = free_port(), "hapkit-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "run"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", *(["--allow-root"] if os.geteuid() == 0 else []), f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # up to a minute to start
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError((tmp_path / "jupyterlab.log").read_text()[-2000:])
                time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not start in a minute")
        yield base, token, lambda: (tmp_path / "jupyterlab.log").read_text()[-3000:]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# what the open notebook says of itself: its code cells' execution counts and the kernel's status
NOTEBOOK_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    if (!panel || !panel.content || !panel.content.widgets) return {};
    const session = panel.sessionContext && panel.sessionContext.session;
    const code = panel.content.widgets.filter(c => c.model.type === 'code');
    return {counts: code.map(c => c.model.executionCount), status: session && session.kernel ? session.kernel.status : null};
}"""


def test_the_ranking_explorer_works_in_jupyterlab(jupyterlab):
    from playwright import sync_api
    base, token, log_tail = jupyterlab
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", timeout=120_000)
        page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=120_000)
        page.wait_for_function(f"({NOTEBOOK_STATE})().status === 'idle'", timeout=120_000)  # the kernel is up
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # every code cell has run (an execution count) and the kernel is idle again
        deadline, state = time.time() + 900, {}
        while time.time() < deadline:
            state = page.evaluate(NOTEBOOK_STATE)
            if state.get("status") == "idle" and state.get("counts") and None not in state["counts"]:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the notebook did not finish running in 15 minutes: {state}; server log: {log_tail()}")
        text = page.inner_text(".jp-Notebook")
        assert "Traceback" not in text and "Error displaying widget" not in text, text[-3000:]
        assert not errors, errors

        def shown_queries():
            return re.findall(r"<b>query (\d+)</b>", page.inner_html(".jp-Notebook"))

        # the single-model explorer: the next-query button and the level toggle
        forward = page.locator("button.widget-button", has_text="▶")
        assert forward.count() >= 2, "expected the explorer and the comparison explorer"
        forward.first.scroll_into_view_if_needed()
        before = shown_queries()
        assert before, "no query shown by the explorer"
        forward.first.click()
        page.wait_for_function(f"!document.querySelector('.jp-Notebook').innerHTML.includes('<b>query {before[0]}</b>')",
                               timeout=30_000)
        assert shown_queries()[0] != before[0]
        groups = page.locator(".widget-toggle-buttons")
        assert groups.count() >= 2
        coarse = groups.first.locator("button").last
        label = coarse.inner_text().strip()
        coarse.click()
        page.wait_for_function(
            f"document.querySelector('.jp-Notebook').innerText.includes('binary AP at {label}')", timeout=30_000
        )
        assert "mod-active" in (coarse.get_attribute("class") or "")

        # the comparison explorer: one header per model; its query slider follows its ▶ button,
        # and its level toggle changes the AP both headers show
        text = page.inner_text(".jp-Notebook")
        assert "HAPPIER: H-AP" in text and "SupAP: H-AP" in text, text[-2000:]
        readout = page.locator(".widget-hslider", has=page.locator("label", has_text="query")).last.locator(".widget-readout")
        shown = readout.inner_text().strip()
        forward.last.scroll_into_view_if_needed()
        forward.last.click()
        deadline = time.time() + 30
        while readout.inner_text().strip() == shown and time.time() < deadline:
            time.sleep(0.2)
        assert readout.inner_text().strip() != shown
        family = groups.last.locator("button").last
        family_label = family.inner_text().strip()
        family.click()
        headers = [page.locator(".widget-html", has_text=f"{name}: H-AP").last for name in ("HAPPIER", "SupAP")]
        deadline = time.time() + 30
        while not all(f"AP@{family_label} " in h.inner_text() for h in headers) and time.time() < deadline:
            time.sleep(0.2)
        assert all(f"AP@{family_label} " in h.inner_text() for h in headers), [h.inner_text() for h in headers]
        out = ROOT / "results"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "jupyterlab_05_ranking_explorer.png"), full_page=False)
        browser.close()
    assert (ROOT / "results" / "jupyterlab_05_ranking_explorer.png").stat().st_size > 10_000
