"""ComfyUI's real web front end in headless Chromium, driven by Playwright (the PyPI package's driver only: the
browser is the system's Chromium, so nothing downloads one). Shared by the front-end tests and the template
thumbnails (headless/build_workflows.py --thumbnails)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]  # containers often give /dev/shm only 64 MB
VIEWPORT = {"width": 1920, "height": 1200}
# Seeded into the server's fresh user directory: no first-run templates dialog, no minimap over the
# graph, and the missing-nodes warning on (its default) whatever the front end's defaults become.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": True,
            "Comfy.Minimap.Visible": False}

FIT_JS = """([left, top, margin]) => {
    const rects = app.graph._nodes.map(n => n.boundingRect);
    const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
    const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
    const el = app.canvas.canvas, w = el.clientWidth, h = el.clientHeight;
    const scale = Math.min(1, (w - left - margin) / (x1 - x0), (h - top - margin) / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [left / scale - x0, top / scale - y0];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return scale;
}"""


class FrontendUnavailable(RuntimeError):
    pass


def chromium() -> str:
    for candidate in (os.environ.get("RAPM_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FrontendUnavailable("Chromium not found: run scripts/setup.sh as root (it installs Debian's `chromium`), "
                              "or `apt-get install chromium`, or set RAPM_CHROMIUM to a Chromium/Chrome binary")


def user_directory(base: Path) -> Path:
    """A fresh ComfyUI user directory with SETTINGS, for main.py --user-directory."""
    user = Path(base) / "user"
    (user / "default").mkdir(parents=True, exist_ok=True)
    (user / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    return user


@contextlib.contextmanager
def open_page(url: str, profile: Path):
    """A Chromium page on the front end at `url`, the app and this pack's node types loaded. page.page_errors
    collects uncaught page errors."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise FrontendUnavailable("playwright is not installed: `pip install -e .[test]` (scripts/setup.sh does it)") from None
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium(), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            timeout=60_000)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.page_errors = []
            page.on("pageerror", lambda e: page.page_errors.append(str(e)))
            # The "Introducing Nodes 2.0" banner would cover the top of every screenshot.
            page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            page.goto(url + "/", timeout=60_000)
            page.wait_for_function(
                "() => window.app && app.graph && app.canvas && window.LiteGraph"
                " && 'RAPMSampler' in LiteGraph.registered_node_types"
                " && !document.querySelector('.p-progressspinner, #loading-container')", timeout=60_000)
            yield page
        finally:
            context.close()


def next_frames(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


TOASTS = ".p-toast-message, [role=alert], [role=status]"  # PrimeVue's (front end 1.3x) and 1.4x's notices


def close_dialogs(page) -> None:
    """Close open dialogs and dismiss toasts, as a user would before going on."""
    for _ in range(3):
        if not page.locator(".p-dialog, [role=dialog]").count():
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)
    page.evaluate("""(selector) => { for (const toast of document.querySelectorAll(selector))
        for (const b of toast.querySelectorAll('button')) if (/close|dismiss/i.test(b.getAttribute('aria-label') || '')
            || b.classList.contains('p-toast-close-button')) b.click(); }""", TOASTS)
    page.wait_for_timeout(200)


def load_workflow(page, workflow: dict) -> None:
    """Load a UI-format workflow as the page does (app.loadGraphData), after closing what the last one opened,
    and let its dialogs mount and every node draw (widgets get their y when drawn)."""
    close_dialogs(page)
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    next_frames(page)
    page.wait_for_timeout(300)


def fit_graph(page, left: int = 72, top: int = 110, margin: int = 24) -> float:
    scale = page.evaluate(FIT_JS, [left, top, margin])
    next_frames(page)
    return scale
