"""A run in the real front end, as a user makes it: the demo template queued from the page of the real server
(main.py --cpu) in headless Chromium, then read back from what the page shows on the nodes: RAPM Train's text line
(fresh at each run, updated while it trains, and after Cancel naming the checkpoint to resume from) and LoRA
Save's saved file (kept, not copied, when the same LoRA is saved again). The page's own Cancel button is pressed.
A screenshot of the graph after Cancel goes to $RAPM_SCREENSHOTS (default: this test's tmp dir)."""
import json
import os
import re
import time
from pathlib import Path

import pytest

from comfy_server import running_server
from comfy_rapm import checkpoints
from headless import frontend

pytestmark = pytest.mark.frontend

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "example_workflows" / "rapm-1-demo-emoji-teacher-no-downloads.json"
TRAIN, SAVE = 3, 4  # the demo's node ids
NODE_TEXT = """(id) => {
    const w = (app.graph.getNodeById(id).widgets || []).find(w => w.name.includes('text-preview'));
    return w ? String(w.value) : '';
}"""
SET_WIDGETS = """(values) => {
    for (const [type, name, value] of values)
        for (const n of app.graph._nodes)
            if (n.type === type) n.widgets.find(w => w.name === name).value = value;
}"""
SMALL = [["RAPMTeacherTrajectory", "count", 2], ["RAPMTeacherTrajectory", "fine_steps", 2],
         ["RAPMTrain", "iterations", 6], ["RAPMTrain", "lora_rank", 2]]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    base = tmp_path_factory.mktemp("frontend_run")
    (base / "loras").mkdir()
    paths = base / "extra_model_paths.yaml"  # LoRAs saved here, not into the host's models/loras
    paths.write_text(f"test:\n  base_path: {base}\n  is_default: true\n  loras: loras\n")
    with running_server(base, "--output-directory", str(base / "output"), "--user-directory",
                        str(frontend.user_directory(base)), "--disable-api-nodes", "--extra-model-paths-config",
                        str(paths)) as url:
        try:
            with frontend.open_page(url, base / "profile") as page:
                frontend.load_workflow(page, json.loads(DEMO.read_text()))
                page.evaluate(RECORD_TEXTS)
                yield page, base
        except frontend.FrontendUnavailable as e:
            pytest.fail(str(e))


RECORD_TEXTS = """() => {
    window.__rapmTexts = [];
    app.api.addEventListener('progress_text', e => window.__rapmTexts.push([String(e.detail.nodeId), e.detail.text]));
}"""


def _queue(page) -> int:
    """Queue the graph as the page's Run button does; returns where this run's node texts start."""
    start = page.evaluate("() => window.__rapmTexts.length")
    page.evaluate("() => app.queuePrompt(0, 1)")
    return start


def _texts_until(page, node_id, done, start, timeout=240.0):
    """The texts the page received for the node since `start`, in order, until done(text) — then the node must show
    the last of them. Fails naming what it saw after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [t for n, t in page.evaluate("(start) => window.__rapmTexts.slice(start)", start) if n == str(node_id)]
        if seen and done(seen[-1]):
            page.wait_for_timeout(100)  # let the node's widget take it
            assert page.evaluate(NODE_TEXT, node_id) == seen[-1], "the node does not show the text it was sent"
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"node {node_id} got {seen[-3:] or 'nothing'} in {timeout:.0f} s")
        time.sleep(0.25)


def test_a_run_from_the_page_shows_fresh_progress_and_the_saved_file(ui):
    page, base = ui
    page.evaluate(SET_WIDGETS, SMALL)
    start = _queue(page)
    train = _texts_until(page, TRAIN, lambda t: t.startswith("6/6 it ·") and "loss" in t, start)
    assert train[0].startswith("0/6 it ·") and "loading" in train[0], train
    assert len([t for t in train if re.match(r"[1-5]/6 it · ", t)]) >= 3, train  # updated while it trained
    save = _texts_until(page, SAVE, lambda t: t.startswith("saved "), start)
    assert save[-1] == "saved models/loras/rapm/demo.safetensors"
    assert sorted(p.name for p in (base / "loras" / "rapm").iterdir()) == ["demo.safetensors"]

    # Queued again with a setting outside the run's identity: RAPM Train runs (and resumes its finished run), its
    # line starts over instead of keeping the last run's, and LoRA Save keeps the file it wrote for this LoRA.
    page.evaluate(SET_WIDGETS, [["RAPMTrain", "checkpoint_every", 3]])
    start = _queue(page)
    again = _texts_until(page, TRAIN, lambda t: "resumed" in t, start)
    assert again[0].startswith("6/6 it · loading"), again
    kept = _texts_until(page, SAVE, lambda t: t.startswith("unchanged"), start)
    assert kept[-1] == "unchanged, kept models/loras/rapm/demo.safetensors"
    assert sorted(p.name for p in (base / "loras" / "rapm").iterdir()) == ["demo.safetensors"]


def test_cancel_on_the_page_leaves_a_checkpoint_and_says_how_to_resume(ui, tmp_path):
    page, base = ui
    page.evaluate(SET_WIDGETS, SMALL + [["RAPMTrain", "iterations", 500], ["RAPMTrain", "name", "ui_cancel"]])
    start = _queue(page)
    _texts_until(page, TRAIN, lambda t: re.match(r"[2-9]\d*/500 it · ", t) is not None, start)
    page.get_by_role("button", name="Cancel current run").click()
    line = _texts_until(page, TRAIN, lambda t: t.startswith("Cancelled"), start, timeout=60)[-1]
    match = re.fullmatch(r"Cancelled at (\d+)/500 it: checkpoint saved in (.+)\. Queue again with the same name "
                         r"\(ui_cancel\) and settings to resume\.", line)
    assert match, line
    assert checkpoints.Run(match[2], {}).saved_iteration() == int(match[1]) >= 2
    frontend.fit_graph(page)
    shots = Path(os.environ.get("RAPM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "demo_after_cancel.png"))
