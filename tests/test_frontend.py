"""The real web front end: the ComfyUI server (main.py --cpu) with its front end (the pip package
comfyui-frontend-package) in headless Chromium (headless/frontend.py). Each example_workflows/*.json is loaded through the
front end's own `app.loadGraphData`, then:

  * no missing-nodes dialog (the front end's "global-missing-nodes" dialog, `.comfy-missing-nodes` list),
    the missing-models dialog offering exactly the checkpoints the workflow names (none are on this server),
    and no other dialog or error/warning toast is showing, `app.showMissingNodesError` was never called,
    and every node in `app.graph` is an instance of its registered type (a missing type becomes a bare
    LGraphNode placeholder);
  * every RAPM node is in `app.graph._nodes` with widgets named as its INPUT_TYPES widget inputs (plus the
    front end's control_after_generate after a seed), holding the workflow's widgets_values, drawn inside
    the node and not under another node;
  * a screenshot per workflow goes to $RAPM_SCREENSHOTS (default: this test's tmp dir).

A bogus node type is loaded last, to prove the missing-node checks do fire in this front end version.
Chromium comes from scripts/setup.sh (Debian `chromium`); RAPM_CHROMIUM overrides its path.
"""
import json
import os
from pathlib import Path

import pytest

from comfy_server import running_server
from headless import frontend
from headless.comfy_host import boot
from headless.convert import widget_slots

pytestmark = pytest.mark.frontend

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p.name for p in (REPO / "example_workflows").glob("*.json"))


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return b == pytest.approx(a, rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """main.py --cpu on a free port, with fresh user/input/output folders. Yields its base URL."""
    base_dir = tmp_path_factory.mktemp("frontend_server")
    with running_server(base_dir, "--output-directory", str(base_dir / "output"), "--input-directory",
                        str(base_dir / "input"), "--user-directory", str(frontend.user_directory(base_dir)),
                        "--disable-api-nodes") as url:
        yield url


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """Headless Chromium (fresh user-data-dir) on the front end, app and node definitions loaded."""
    try:
        with frontend.open_page(server, tmp_path_factory.mktemp("chromium_profile")) as pg:
            # Record every missing-node report, whatever the setting or the dialog's look (front ends that have
            # app.showMissingNodesError; the dialog and the placeholders are checked on every front end).
            pg.evaluate("""() => {
                window.__rapmMissing = [];
                if (typeof app.showMissingNodesError !== 'function') return;
                const original = app.showMissingNodesError.bind(app);
                app.showMissingNodesError = (types) => { window.__rapmMissing.push(...types); return original(types); };
            }""")
            yield pg
    except frontend.FrontendUnavailable as e:
        pytest.fail(str(e))


STATE_JS = """(toastSelector) => {
    const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const registered = LiteGraph.registered_node_types;
    return {
        frontend: window.__COMFYUI_FRONTEND_VERSION__,
        missingReported: window.__rapmMissing.map(t => typeof t === 'string' ? t : t.type),
        missingDialog: Array.from(document.querySelectorAll(
            '[aria-labelledby="global-missing-nodes"], .comfy-missing-nodes')).filter(visible).map(e => e.innerText),
        dialogs: Array.from(document.querySelectorAll('.p-dialog, [role=dialog]')).filter(visible)
            .map(e => (e.getAttribute('aria-labelledby') || '') + ': ' + e.innerText.slice(0, 300)),
        toasts: Array.from(document.querySelectorAll(toastSelector)).filter(visible)
            .map(e => e.className + ': ' + e.innerText.slice(0, 300)),
        nodes: app.graph._nodes.map(n => ({
            id: String(n.id), type: n.type, title: n.title, mode: n.mode, collapsed: !!(n.flags && n.flags.collapsed),
            placeholder: !registered[n.type] || n.constructor !== registered[n.type], errors: !!n.has_errors,
            rect: Array.from(n.boundingRect), pos: Array.from(n.pos), size: Array.from(n.size),
            widgets: (n.widgets || []).map(w => ({
                name: w.name, type: w.type, value: w.value, hidden: !!w.hidden,
                y: w.last_y ?? w.y, height: w.computedHeight ?? (w.computeSize ? w.computeSize(n.size[0])[1] : 20),
            })),
        })),
    };
}"""

def _overlaps(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _check(workflow, state, classes):
    problems = []
    if state["missingReported"]:
        problems.append(f"front end reported missing node types: {state['missingReported']}")
    if state["missingDialog"]:
        problems.append(f"missing-nodes dialog shown: {state['missingDialog']}")
    # The checkpoints a workflow names (node.properties.models) are not on this server: the front end must say so
    # and offer them, as each release does it (1.3x: the missing-models dialog, folder / file with a download;
    # 1.4x: an error toast naming the file, the loader marked), and show no other dialog or warning.
    models = [m for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])]
    loaders = {str(n["id"]) for n in workflow["nodes"] if n.get("properties", {}).get("models")}
    dialog = [d for d in state["dialogs"] if d.startswith("global-missing-models-warning:")]
    toasts = [t for t in state["toasts"] if any(m["name"] in t for m in models)]
    offered = (len(dialog) == 1 and all(f"{m['directory']} / {m['name']}" in dialog[0] for m in models)
               and "Download" in dialog[0]) or (not dialog and len(toasts) == len(models))
    if models and not offered:
        problems.append(f"the front end does not report the missing {[m['name'] for m in models]}: dialogs "
                        f"{state['dialogs']}, toasts {state['toasts']}")
    if [d for d in state["dialogs"] if d not in dialog] or (dialog and not models):
        problems.append(f"dialogs open: {state['dialogs']}")
    bad_toasts = [t for t in state["toasts"] if t not in toasts and ("error" in t or "warn" in t or "missing" in t.lower())]
    if bad_toasts:
        problems.append(f"error/warning toasts: {bad_toasts}")
    flagged = [(n["id"], n["type"]) for n in state["nodes"] if n["errors"] and n["id"] not in loaders]
    if flagged:
        problems.append(f"nodes marked with errors: {flagged}")
    placeholders = [(n["id"], n["type"]) for n in state["nodes"] if n["placeholder"]]
    if placeholders:
        problems.append(f"nodes without a registered type (missing-node placeholders): {placeholders}")

    live = {n["id"]: n for n in state["nodes"]}
    want_ids = sorted(str(n["id"]) for n in workflow["nodes"])
    if sorted(live) != want_ids:
        problems.append(f"graph has nodes {sorted(live)}, the file {want_ids}")
    rapm = [n for n in workflow["nodes"] if n["type"].startswith("RAPM")]
    if not rapm:
        problems.append("no RAPM node in the workflow")
    for spec in rapm:
        node = live.get(str(spec["id"]))
        tag = f"#{spec['id']} {spec['type']}"
        if node is None or node["type"] != spec["type"]:
            problems.append(f"{tag}: not in app.graph._nodes ({node and node['type']})")
            continue
        names = [w["name"] for w in node["widgets"]]
        want = widget_slots(classes[spec["type"]])
        if names != want:
            problems.append(f"{tag}: widgets {names}, INPUT_TYPES gives {want}")
        values = [w["value"] for w in node["widgets"]]
        if len(values) != len(spec["widgets_values"]) or not all(map(_same, spec["widgets_values"], values)):
            problems.append(f"{tag}: widget values {values}, the file has {spec['widgets_values']}")
        if node["collapsed"] or node["mode"] != 0:
            problems.append(f"{tag}: collapsed or not in mode 0 (always)")
        for w in node["widgets"]:
            if w["hidden"] or w["y"] is None or not (0 <= w["y"] and w["y"] + w["height"] <= node["size"][1] + 1):
                problems.append(f"{tag}: widget {w['name']} not drawn inside the node (y={w['y']}, "
                                f"height={w['height']}, node height {node['size'][1]}, hidden={w['hidden']})")
        if node["widgets"]:
            top = node["pos"][1] + min(w["y"] or 0 for w in node["widgets"])
            bottom = node["pos"][1] + max((w["y"] or 0) + w["height"] for w in node["widgets"])
            area = [node["pos"][0], top, node["size"][0], bottom - top]
            covering = [(o["id"], o["type"]) for o in state["nodes"] if o["id"] != node["id"] and _overlaps(area, o["rect"])]
            if covering:
                problems.append(f"{tag}: its widgets overlap nodes {covering}")
    for i, a in enumerate(state["nodes"]):  # the layout: no node covers another
        for b in state["nodes"][i + 1:]:
            if _overlaps(a["rect"], b["rect"]):
                problems.append(f"nodes #{a['id']} {a['type']} and #{b['id']} {b['type']} overlap")
    return problems


def test_workflows_load_in_the_real_front_end(page, tmp_path):
    shots = Path(os.environ.get("RAPM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    classes = boot(cpu=True).NODE_CLASS_MAPPINGS
    failures = {}
    for name in WORKFLOWS:
        workflow = json.loads((REPO / "example_workflows" / name).read_text())
        errors_before = len(page.page_errors)
        frontend.load_workflow(page, workflow)
        frontend.fit_graph(page)
        shot = shots / (Path(name).stem + ".png")
        page.screenshot(path=str(shot))
        state = page.evaluate(STATE_JS, frontend.TOASTS)
        problems = _check(workflow, state, classes)
        if len(page.page_errors) > errors_before:
            problems.append(f"uncaught page errors while loading: {page.page_errors[errors_before:]}")
        if problems:
            failures[name] = problems
        assert shot.is_file() and shot.stat().st_size > 10_000
    assert not failures, (f"front end {page.evaluate('window.__COMFYUI_FRONTEND_VERSION__')}, screenshots in {shots}:\n"
                          + json.dumps(failures, indent=1))

    # The checks above can fail: a type the server does not know brings up the dialog and a placeholder.
    bogus = json.loads((REPO / "example_workflows" / WORKFLOWS[0]).read_text())
    bogus["nodes"][0]["type"] = "RAPMNoSuchNode"
    frontend.load_workflow(page, bogus)
    state = page.evaluate(STATE_JS, frontend.TOASTS)
    # each release reports it its own way: app.showMissingNodesError and its dialog (1.2x-1.3x), a notice (1.4x)
    reports = state["missingReported"] + state["missingDialog"] + state["toasts"]
    assert any("RAPMNoSuchNode" in report for report in reports), state
    assert [n["type"] for n in state["nodes"] if n["placeholder"]] == ["RAPMNoSuchNode"]


def test_every_rapm_node_type_builds_its_widgets(page):
    """All six node types, RAPMLoadTrajectories included (no workflow has one), as the front end builds
    them from /object_info: registered, with the INPUT_TYPES widgets in order."""
    classes = boot(cpu=True).NODE_CLASS_MAPPINGS
    rapm = sorted(name for name in classes if name.startswith("RAPM"))
    assert len(rapm) == 6, rapm
    built = page.evaluate("""(types) => Object.fromEntries(types.map(t => {
        const n = LiteGraph.createNode(t);
        return [t, n && n.constructor === LiteGraph.registered_node_types[t] ? (n.widgets || []).map(w => w.name) : null];
    }))""", rapm)
    assert built == {name: widget_slots(classes[name]) for name in rapm}
    # RAPM Train's advanced inputs reach the front end as advanced widgets (its properties panel folds them away)
    advanced = page.evaluate("""() => LiteGraph.createNode('RAPMTrain').widgets
        .filter(w => w.options && w.options.advanced).map(w => w.name)""")
    spec = classes["RAPMTrain"].INPUT_TYPES()
    marked = [n for section in ("required", "optional") for n, e in spec[section].items()
              if len(e) > 1 and e[1].get("advanced")]
    assert advanced == marked, advanced
    assert "iterations" not in marked and "name" not in marked and len(marked) >= 8


def test_the_template_browser_shows_a_card_with_a_picture_for_each_workflow(page, tmp_path):
    """The pack's templates as the front end lists them: one card per example workflow, titled by its file name
    (the front end's rule for packs' templates) and showing its thumbnail (<name>.jpg, served by the host)."""
    names = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert names[0].startswith("rapm-1-demo")  # the demo first wherever the list is sorted by name
    frontend.close_dialogs(page)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("comfy-rapm", exact=True).first.click()
    page.wait_for_function("""(names) => names.every(n => Array.from(document.querySelectorAll('[role=dialog] img'))
        .some(i => i.alt === n && i.complete && i.naturalWidth > 0))""", arg=names, timeout=30_000)
    cards = page.evaluate("""() => Array.from(document.querySelectorAll('[role=dialog] img'))
        .map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight}))""")
    shots = Path(os.environ.get("RAPM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "template_browser.png"))
    frontend.close_dialogs(page)
    assert sorted(c["alt"] for c in cards) == names, cards
    assert all(c["width"] >= 320 and c["height"] >= 200 for c in cards), cards
