"""Run a ComfyUI workflow file (UI or API format) through ComfyUI's own executor, in-process.

    python headless/run.py workflow.json [--set "KSampler.seed=7"] [--output-directory out/]
                                         [--models models/] [--cpu] [--print-api] [--quiet]

UI-format files (what the ComfyUI page saves: `nodes` + `links`, widget values by position) are
converted to the API format (`{id: {class_type, inputs}}`) from the installed nodes' own
INPUT_TYPES, the way the ComfyUI front end does it when you press Queue: UI-only nodes (Note,
Reroute, PrimitiveNode) are dropped and resolved into their targets, muted nodes are skipped,
bypassed nodes pass their first input of the matching type through, and the seed widgets'
"control after generate" values are dropped. The graph is then validated and executed by the
host's `execution.PromptExecutor`, exactly as the server would.

Exit codes: 0 success, 1 validation or execution error, 2 bad file / bad option / host not found,
130 cancelled with Ctrl-C (the running node is interrupted at its next progress update or check;
a second Ctrl-C exits at once).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python headless/run.py
    _repo = str(Path(__file__).resolve().parent.parent)
    if _repo not in sys.path:
        sys.path.insert(0, _repo)

from headless import comfy_host, ranks  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130

MODE_MUTED = 2      # LiteGraph "never"
MODE_BYPASS = 4     # ComfyUI "bypass"
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE_TYPES = {"Reroute"}
PRIMITIVE_TYPES = {"PrimitiveNode"}
UI_ONLY_TYPES = NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_NAMES = {"seed", "noise_seed"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload", "model_upload")
UPLOAD_VALUES = {"image", "video", "audio", "file", "model", "upload", None}
_MISSING = object()


class WorkflowError(Exception):
    """A problem with the workflow file or an option; reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# reading the file

def load_workflow(path: str) -> dict:
    """Read PATH as JSON; any problem becomes a one-line WorkflowError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise WorkflowError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"{path} is not a text (UTF-8 JSON) file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path} is not a ComfyUI workflow: the top level is a JSON "
                            f"{type(data).__name__}, expected an object")
    return data


def workflow_format(data: dict) -> str:
    """'ui' (nodes + links), 'api' ({id: {class_type, inputs}}), or raise WorkflowError."""
    if isinstance(data.get("nodes"), list):
        return "ui"
    graph = data.get("prompt") if isinstance(data.get("prompt"), dict) and "class_type" not in data else data
    if graph and all(isinstance(v, dict) and "class_type" in v for v in graph.values()):
        return "api"
    if not data:
        raise WorkflowError("the workflow file is an empty JSON object")
    raise WorkflowError("not a ComfyUI workflow: expected a UI-format file (with \"nodes\" and \"links\") "
                        "or an API-format file ({\"<id>\": {\"class_type\": ..., \"inputs\": {...}}})")


def api_graph(data: dict) -> dict:
    """The API graph of an API-format file (also accepts the /prompt body {"prompt": {...}})."""
    graph = data.get("prompt") if isinstance(data.get("prompt"), dict) and "class_type" not in data else data
    out = {}
    for node_id, node in graph.items():
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"node {node_id}: \"inputs\" must be an object")
        if not isinstance(node["class_type"], str):
            raise WorkflowError(f"node {node_id}: \"class_type\" must be a string")
        out[str(node_id)] = {**node, "inputs": dict(inputs)}
    for node_id, node in out.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                if len(value) != 2 or not isinstance(value[1], int):
                    raise WorkflowError(f"node {node_id}, input '{name}': a link must be [\"<node id>\", <output "
                                        f"index>], got {json.dumps(value)[:60]}")
                if str(value[0]) not in out:
                    raise WorkflowError(f"node {node_id}, input '{name}' links to node {value[0]}, which is not "
                                        "in the graph")
                node["inputs"][name] = [str(value[0]), value[1]]
    return out


# ------------------------------------------------------------------------------------------------
# UI -> API conversion

@dataclass
class _Link:
    origin: str
    origin_slot: int
    target: str
    target_slot: int
    type: object = None


def _display_name(class_type: str, node_classes: dict, display_names: dict | None) -> str:
    if display_names and class_type in display_names:
        return display_names[class_type]
    cls = node_classes.get(class_type)
    return getattr(cls, "DISPLAY_NAME", None) or class_type


def _spec_entries(cls) -> list[tuple[str, object, dict]]:
    """(name, type, options) for the class's required then optional inputs, in declared order."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            if not isinstance(entry, (list, tuple)) or not entry:
                entry = (entry,)
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, kind, opts))
    return out


def _is_combo(kind, opts) -> bool:
    return isinstance(kind, (list, tuple)) or (isinstance(kind, str) and kind == "COMBO")


def _combo_options(kind, opts) -> list:
    if isinstance(kind, (list, tuple)):
        return list(kind)
    return list(opts.get("options") or [])


def _is_widget(name, kind, opts, ui_input) -> bool:
    """A widget has a value slot in widgets_values. The UI's own input entry is authoritative
    (new front ends list every widget input with a "widget" key; old ones only converted widgets,
    and link-only inputs never have one); without an entry, decide from the declared type."""
    if ui_input is not None:
        return "widget" in ui_input
    if opts.get("forceInput") or opts.get("defaultInput"):
        return False
    return _is_combo(kind, opts) or (isinstance(kind, str) and kind in WIDGET_TYPES)


def _has_control(name, kind, opts) -> bool:
    if opts.get("control_after_generate"):
        return True
    return isinstance(kind, str) and kind == "INT" and name in SEED_NAMES


def _widget_default(kind, opts):
    if "default" in opts:
        return opts["default"]
    if _is_combo(kind, opts):
        options = _combo_options(kind, opts)
        return options[0] if options else _MISSING
    return _MISSING


def _wrap_value(value):
    # A list in the API format means a link; list-valued widgets travel as {"__value__": [...]}.
    return {"__value__": value} if isinstance(value, list) else value


class _Converter:
    def __init__(self, workflow: dict, node_classes: dict, display_names: dict | None):
        self.classes = node_classes
        self.display_names = display_names
        self.notes: list[str] = []
        nodes = workflow.get("nodes")
        if not isinstance(nodes, list):
            raise WorkflowError("UI workflow: \"nodes\" must be a list")
        self.nodes: dict[str, dict] = {}
        for n in nodes:
            if not isinstance(n, dict) or "id" not in n or not isinstance(n.get("type"), str):
                raise WorkflowError("UI workflow: every entry of \"nodes\" needs an \"id\" and a \"type\"")
            self.nodes[str(n["id"])] = n
        self.links: dict[str, _Link] = {}
        raw_links = workflow.get("links") or []
        if not isinstance(raw_links, list):
            raise WorkflowError("UI workflow: \"links\" must be a list")
        for link in raw_links:
            try:
                if isinstance(link, dict):
                    lid, o, os_, t, ts = (link["id"], link["origin_id"], link["origin_slot"],
                                          link["target_id"], link["target_slot"])
                    ltype = link.get("type")
                else:
                    lid, o, os_, t, ts = link[:5]
                    ltype = link[5] if len(link) > 5 else None
                self.links[str(lid)] = _Link(str(o), int(os_), str(t), int(ts), ltype)
            except (KeyError, TypeError, ValueError, IndexError):
                raise WorkflowError(f"UI workflow: malformed link {json.dumps(link)[:80]} (expected "
                                    "[id, from_node, from_slot, to_node, to_slot, type])") from None
        subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
        self.subgraph_ids = {str(s.get("id")): s.get("name") for s in subgraphs if isinstance(s, dict)}
        self.group_nodes = set(((workflow.get("extra") or {}).get("groupNodes") or {}).keys())

    # -- naming
    def title(self, node: dict) -> str:
        return node.get("title") or _display_name(node["type"], self.classes, self.display_names)

    def label(self, node: dict) -> str:
        return f"node {node['id']} '{self.title(node)}'"

    # -- checks
    def _check_supported(self, node: dict) -> None:
        t = node["type"]
        if t in self.subgraph_ids:
            raise WorkflowError(f"{self.label(node)} is a subgraph ('{self.subgraph_ids[t] or t}'); subgraphs "
                                "are not supported by headless/run.py: unpack it in ComfyUI (right-click > "
                                "Unpack Subgraph) and save again")
        if t.startswith("workflow>") or t.startswith("workflow/") or t in self.group_nodes:
            raise WorkflowError(f"{self.label(node)} is a group node ('{t}'); group nodes are not supported by "
                                "headless/run.py: convert it back to nodes in ComfyUI and save again")

    def _linked(self, node: dict) -> bool:
        ins = any(isinstance(i, dict) and i.get("link") is not None for i in node.get("inputs") or [])
        outs = any(isinstance(o, dict) and o.get("links") for o in node.get("outputs") or [])
        return ins or outs

    # -- link resolution (reroutes, primitives, bypass, mute)
    def resolve(self, link_id, want_type, depth: int = 0):
        """('link', node_id, slot) | ('value', v) | ('none', why)."""
        if depth > 200:
            raise WorkflowError("UI workflow: a cycle of reroutes/bypassed nodes")
        link = self.links.get(str(link_id))
        if link is None:
            return ("none", f"link {link_id} is not in the links list")
        src = self.nodes.get(link.origin)
        if src is None:
            return ("none", f"its source node {link.origin} does not exist")
        self._check_supported(src)
        t, mode = src["type"], src.get("mode", 0)
        if mode == MODE_MUTED:
            return ("none", f"its source {self.label(src)} is muted")
        if t in REROUTE_TYPES:
            ins = src.get("inputs") or []
            upstream = ins[0].get("link") if ins and isinstance(ins[0], dict) else None
            if upstream is None:
                return ("none", f"the reroute node {src['id']} has nothing connected")
            return self.resolve(upstream, want_type, depth + 1)
        if t in PRIMITIVE_TYPES:
            values = src.get("widgets_values")
            if isinstance(values, list) and values:
                return ("value", values[0])
            return ("none", f"the primitive node {src['id']} has no value")
        if t in NOTE_TYPES:
            return ("none", f"its source node {src['id']} is a note")
        if mode == MODE_BYPASS:
            ins = [i if isinstance(i, dict) else {} for i in src.get("inputs") or []]
            order = [link.origin_slot] + list(range(len(ins)))
            for idx in order:
                if 0 <= idx < len(ins) and want_type is not None and ins[idx].get("type") == want_type:
                    upstream = ins[idx].get("link")
                    if upstream is None:
                        return ("none", f"its source {self.label(src)} is bypassed and its {want_type} "
                                        "input is not connected")
                    return self.resolve(upstream, want_type, depth + 1)
            return ("none", f"its source {self.label(src)} is bypassed and has no {want_type} input to "
                            "pass through")
        return ("link", link.origin, link.origin_slot)

    # -- one node
    def node_inputs(self, node: dict, cls) -> dict:
        entries = _spec_entries(cls)
        ui_inputs: dict[str, dict] = {}
        for entry in node.get("inputs") or []:
            if isinstance(entry, dict):
                name = (entry.get("widget") or {}).get("name") or entry.get("name")
                if name:
                    ui_inputs[name] = entry
        values = node.get("widgets_values")
        widgets = [(n, k, o) for n, k, o in entries if _is_widget(n, k, o, ui_inputs.get(n))]
        widget_values: dict[str, object] = {}
        if isinstance(values, dict):  # some packs save widget values by name
            for name, kind, opts in widgets:
                if name in values:
                    widget_values[name] = values[name]
        elif isinstance(values, list):
            widget_values = self._positional(widgets, values)
        elif values is not None:
            raise WorkflowError(f"{self.label(node)}: \"widgets_values\" must be a list")
        for name, kind, opts in widgets:
            if name not in widget_values:
                default = _widget_default(kind, opts)
                if default is not _MISSING:
                    widget_values[name] = default

        inputs: dict[str, object] = {}
        linked: dict[str, object] = {}
        dropped: set[str] = set()
        for name, entry in ui_inputs.items():
            link_id = entry.get("link")
            if link_id is None:
                continue
            want = entry.get("type")
            if want is None:
                link = self.links.get(str(link_id))
                want = link.type if link else None
            kind, value = self._resolved(link_id, want)
            if kind == "link":
                linked[name] = value
            elif kind == "value":
                linked[name] = _wrap_value(value)
            else:
                dropped.add(name)
                self.notes.append(f"{self.label(node)}: input '{name}' left unconnected because {value}")
        for name, kind, opts in entries:
            if name in linked:
                inputs[name] = linked[name]
            elif name in widget_values and name not in dropped:
                inputs[name] = _wrap_value(widget_values[name])
        for name, value in linked.items():  # dynamic inputs the class does not declare
            inputs.setdefault(name, value)
        return inputs

    def _resolved(self, link_id, want):
        r = self.resolve(link_id, want)
        if r[0] == "link":
            return "link", [r[1], r[2]]
        return r

    def _positional(self, widgets, values: list) -> dict:
        out = {}
        i = 0
        for w, (name, kind, opts) in enumerate(widgets):
            if i >= len(values):
                break
            out[name] = values[i]
            i += 1
            remaining = len(widgets) - w - 1
            nxt = widgets[w + 1] if remaining else None

            def valid_for_next(v):
                return nxt is not None and _is_combo(nxt[1], nxt[2]) and v in _combo_options(nxt[1], nxt[2])

            # "control after generate" value the UI stores after seed-like widgets
            if i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES:
                is_int = isinstance(kind, str) and kind == "INT"
                if _has_control(name, kind, opts) or (is_int and not valid_for_next(values[i])):
                    i += 1
                    # combo controls carry a filter-list string too
                    if (_is_combo(kind, opts) and i < len(values) and isinstance(values[i], str)
                            and len(values) - i > remaining):
                        i += 1
                    continue
            # the upload button's value after an upload combo (LoadImage: ["example.png", "image"])
            if (_is_combo(kind, opts) and any(opts.get(f) for f in UPLOAD_FLAGS) and i < len(values)
                    and values[i] in UPLOAD_VALUES and len(values) - i > remaining and not valid_for_next(values[i])):
                i += 1
        return out

    def convert(self) -> dict:
        api: dict[str, dict] = {}

        def sort_key(item):
            k = item[0]
            return (0, int(k), "") if k.lstrip("-").isdigit() else (1, 0, k)

        for node_id, node in sorted(self.nodes.items(), key=sort_key):
            t = node["type"]
            if t in UI_ONLY_TYPES:
                continue
            if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
                continue
            self._check_supported(node)
            cls = self.classes.get(t)
            if cls is None:
                if not self._linked(node):
                    self.notes.append(f"{self.label(node)}: dropped, type '{t}' is not installed and the node "
                                      "is not connected")
                    continue
                close = difflib.get_close_matches(t, list(self.classes), n=3, cutoff=0.7)
                hint = f" (close: {', '.join(close)})" if close else " (is its custom node pack installed?)"
                raise WorkflowError(f"{self.label(node)} has type '{t}', which this ComfyUI does not have{hint}")
            api[node_id] = {"inputs": self.node_inputs(node, cls), "class_type": t,
                            "_meta": {"title": self.title(node)}}
        # like the front end: drop links to nodes that are not in the graph
        for node in api.values():
            for name, value in list(node["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and str(value[0]) not in api:
                    del node["inputs"][name]
        return api


def convert_ui(workflow: dict, node_classes: dict, display_names: dict | None = None) -> tuple[dict, list[str]]:
    """UI-format workflow -> (API graph, notes about inputs left unconnected or nodes dropped)."""
    if display_names is None and "nodes" in sys.modules:
        display_names = getattr(sys.modules["nodes"], "NODE_DISPLAY_NAME_MAPPINGS", None)
    conv = _Converter(workflow, node_classes, display_names)
    return conv.convert(), conv.notes


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """Convert a UI-format workflow (nodes/links, widget values by position) to the API format,
    using the node classes' INPUT_TYPES (e.g. `nodes.NODE_CLASS_MAPPINGS`)."""
    return convert_ui(workflow, node_classes)[0]


# ------------------------------------------------------------------------------------------------
# --set

def _node_title(api: dict, node_id: str, node_classes: dict, display_names: dict | None) -> str:
    node = api[node_id]
    return (node.get("_meta") or {}).get("title") or _display_name(node["class_type"], node_classes, display_names)


def _parse_value(raw: str, api: dict):
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, list):
        if len(value) == 2 and str(value[0]) in api and isinstance(value[1], int):
            return [str(value[0]), value[1]]  # a link, written as in the API format
        return {"__value__": value}
    return value


def _close_list(word: str, choices: list[str], limit: int = 12) -> str:
    close = difflib.get_close_matches(word, choices, n=5, cutoff=0.5)
    if close:
        return "close: " + ", ".join(repr(c) for c in close)
    shown = ", ".join(repr(c) for c in choices[:limit])
    return "choices: " + shown + (f", … ({len(choices)} in all)" if len(choices) > limit else "")


def apply_sets(api: dict, sets: list[str], node_classes: dict, display_names: dict | None = None) -> None:
    """Apply --set "Title.input=value" / "12.input=value" to API graph in place (WorkflowError on a
    bad node or input name)."""
    if display_names is None and "nodes" in sys.modules:
        display_names = getattr(sys.modules["nodes"], "NODE_DISPLAY_NAME_MAPPINGS", None)
    for item in sets:
        lhs, eq, raw = item.partition("=")
        node_part, dot, input_name = lhs.rpartition(".")
        node_part, input_name = node_part.strip(), input_name.strip()
        if not eq or not dot or not node_part or not input_name:
            raise WorkflowError(f"--set {item!r}: expected \"NODE.INPUT=VALUE\" (NODE is a title or an id)")
        titles = {nid: _node_title(api, nid, node_classes, display_names) for nid in api}
        if node_part in api:
            ids = [node_part]
        else:
            ids = [nid for nid, t in titles.items() if t == node_part]
            if not ids:
                ids = [nid for nid, t in titles.items() if t.lower() == node_part.lower()]
            if not ids:
                ids = [nid for nid in api if api[nid]["class_type"] == node_part]
        if not ids:
            names = sorted(set(titles.values())) + sorted(api)
            raise WorkflowError(f"--set {item!r}: no node has the title or id '{node_part}'; "
                                f"{_close_list(node_part, names)}")
        if len(ids) > 1:
            which = ", ".join(f"{nid} ('{titles[nid]}')" for nid in ids)
            raise WorkflowError(f"--set {item!r}: '{node_part}' names several nodes: {which}; use the node id")
        node = api[ids[0]]
        cls = node_classes.get(node["class_type"])
        valid = [n for n, _, _ in _spec_entries(cls)] if cls is not None else []
        valid += [n for n in node["inputs"] if n not in valid]
        if input_name not in valid:
            raise WorkflowError(f"--set {item!r}: node {ids[0]} '{titles[ids[0]]}' ({node['class_type']}) has no "
                                f"input '{input_name}'; {_close_list(input_name, valid)}")
        node["inputs"][input_name] = _parse_value(raw, api)


# ------------------------------------------------------------------------------------------------
# terminal output

def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressDisplay:
    """One bar per node that reports progress: an updating line on a TTY, periodic lines otherwise."""

    def __init__(self, stream, enabled: bool, labels: dict[str, str]):
        self.stream = stream
        self.enabled = enabled
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.labels = labels
        self.key = None
        self.start = 0.0
        self.first_value = 0.0
        self.last_value = -1.0
        self.last_draw = 0.0
        self.last_quarter = -1
        self.open_line = False

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        self.end_line()
        print(text, file=self.stream, flush=True)

    def end_line(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False

    def update(self, node_id, value, total) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        key = str(node_id)
        if key != self.key or value < self.last_value:
            self.end_line()
            self.key, self.start, self.first_value = key, now, value
            self.last_draw, self.last_quarter = 0.0, -1
        self.last_value = value
        total = total or 0
        done = total and value >= total
        frac = min(1.0, value / total) if total else 0.0
        elapsed = now - self.start
        rate = (value - self.first_value) / elapsed if elapsed > 0 and value > self.first_value else 0.0
        if done:
            tail = f"{_fmt_time(elapsed)}"
        elif rate > 0:
            tail = f"ETA {_fmt_time((total - value) / rate)}"
        else:
            tail = "ETA --:--"
        speed = "" if rate == 0 else (f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")
        label = self.labels.get(key, f"#{key}")
        count = f"{value:g}/{total:g}" if total else f"{value:g}"
        if self.tty:
            if not done and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            width = shutil.get_terminal_size((100, 20)).columns
            head = f"  {label} "
            tail_text = f" {count} {frac * 100:3.0f}% {speed + ' ' if speed else ''}{tail}"
            bar_w = max(10, min(40, width - len(head) - len(tail_text) - 3))
            fill = int(frac * bar_w)
            line = f"{head}[{'#' * fill}{'.' * (bar_w - fill)}]{tail_text}"
            self.stream.write("\r" + line[: width - 1] + "\x1b[K")
            self.stream.flush()
            self.open_line = True
            if done:
                self.end_line()
        else:
            quarter = int(frac * 4)
            if done or quarter > self.last_quarter or now - self.last_draw >= 10:
                self.last_draw, self.last_quarter = now, quarter
                print(f"  {label}: {count} ({frac * 100:.0f}%) {speed + ' ' if speed else ''}{tail}",
                      file=self.stream, flush=True)


class HeadlessServer:
    """Stands in for server.PromptServer.instance: the executor reports to it through send_sync."""

    def __init__(self, on_event):
        self.on_event = on_event
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.number = 0

    def send_sync(self, event, data, sid=None):
        self.on_event(event, data)

    async def send(self, event, data, sid=None):
        self.on_event(event, data)

    def send_progress_text(self, text, node_id, sid=None):
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8", "replace")
        self.on_event("progress_text", {"node": node_id, "text": text})

    def queue_updated(self):
        pass


# ------------------------------------------------------------------------------------------------
# running

@dataclass
class _RunState:
    api: dict
    labels: dict
    progress: ProgressDisplay
    cancelled: bool = False
    ui_files: list = field(default_factory=list)
    executed_count: int = 0
    to_run: int = 0
    current: str | None = None


def _label(api: dict, node_id, node_classes, display_names) -> str:
    node = api.get(str(node_id))
    if node is None:
        return f"#{node_id}"
    title = _node_title(api, str(node_id), node_classes, display_names)
    ct = node["class_type"]
    return f"#{node_id} {title}" + ("" if title == ct else f" ({ct})")


def _node_ref(api: dict, node_id, node_classes, display_names) -> str:
    node = api.get(str(node_id))
    if node is None:
        return f"node {node_id}"
    title = _node_title(api, str(node_id), node_classes, display_names)
    ct = node["class_type"]
    return f"node {node_id} '{title}'" + ("" if title == ct else f" ({ct})")


def _reachable(api: dict, outputs) -> int:
    seen, stack = set(), [str(o) for o in outputs]
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in api:
            continue
        seen.add(nid)
        for v in api[nid]["inputs"].values():
            if isinstance(v, list) and len(v) == 2:
                stack.append(str(v[0]))
    return len(seen)


def _ui_output_files(output: dict) -> list[str]:
    import folder_paths
    files = []
    for value in (output or {}).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and "filename" in item:
                base = folder_paths.get_directory_by_type(item.get("type") or "output") or folder_paths.get_output_directory()
                files.append(os.path.join(base, item.get("subfolder") or "", item["filename"]))
            elif isinstance(item, str) and os.path.isabs(item) and os.path.isfile(item):
                files.append(item)
    return files


def _snapshot(directory: str, limit: int = 50000) -> dict | None:
    out = {}
    for root, _dirs, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[p] = (st.st_mtime_ns, st.st_size)
            if len(out) > limit:
                return None
    return out


def _validation_messages(api, error, node_errors, node_classes, display_names) -> list[str]:
    lines = []
    for node_id, info in (node_errors or {}).items():
        ref = _node_ref(api, node_id, node_classes, display_names)
        for err in info.get("errors", []):
            extra = err.get("extra_info") or {}
            name = extra.get("input_name")
            where = f"{ref}, input '{name}'" if name else ref
            text = err.get("message", "invalid")
            details = err.get("details")
            if details and details != name:
                text += f": {details}"
            if err.get("type") == "value_not_in_list" and name:
                text += _combo_hint(api, node_id, name, extra.get("received_value"), node_classes)
            lines.append(f"{where}: {text}")
    if not lines and error:
        msg = error.get("message", "invalid workflow")
        if error.get("details"):
            msg += f": {error['details']}"
        if error.get("type") == "prompt_no_outputs":
            msg += " (no output node such as SaveImage is active: are they muted or bypassed?)"
        lines.append(msg)
    return lines


def _combo_hint(api, node_id, name, received, node_classes) -> str:
    cls = node_classes.get(api[str(node_id)]["class_type"])
    if cls is None:
        return ""
    for n, kind, opts in _spec_entries(cls):
        if n == name and _is_combo(kind, opts):
            options = [str(o) for o in _combo_options(kind, opts)]
            if not options:
                return " (the list is empty: is the model folder registered? see --models)"
            close = difflib.get_close_matches(str(received), options, n=3, cutoff=0.5)
            return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ""


def _error_message(api, data, node_classes, display_names) -> str:
    ref = _node_ref(api, data.get("node_id"), node_classes, display_names)
    exc_type = (data.get("exception_type") or "").rsplit(".", 1)[-1]
    msg = (data.get("exception_message") or "").strip()
    line = f"{ref} failed: {exc_type}: {msg}" if exc_type else f"{ref} failed: {msg}"
    tb = data.get("traceback") or []
    if tb:
        last = tb[-1].strip().splitlines()[0]
        line += f"\n  at {last}"
    return line


class _DropExecutorErrors(logging.Filter):
    """The executor logs validation failures and exception tracebacks itself; this runner reports
    them as one message naming the node and input, so hide the duplicates unless --verbose."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and record.module == "execution")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="headless/run.py",
        description="Run a ComfyUI workflow (UI or API format) through ComfyUI's own executor, in-process.")
    p.add_argument("workflow", help="workflow .json file (saved from the ComfyUI page, or an API-format export)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set an input; NODE is a node title or id; VALUE is parsed as JSON if it parses, "
                        "else taken as a string (repeatable)")
    p.add_argument("--output-directory", help="where Save* nodes write (default: ComfyUI's output/)")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="extra model folder holding checkpoints/, loras/, vae/, … (repeatable)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, then the repo's .comfyui/ComfyUI)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--print-api", action="store_true",
                   help="dry run: print the API-format graph (after --set), validate it, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output; print only output paths and errors")
    p.add_argument("--verbose", action="store_true", help="show ComfyUI's own log (and full tracebacks)")
    ranks.add_arguments(p)
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 1 invalid/failed, 2 bad input, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is installed
        print(file=sys.stderr)
        _err("cancelled")
        return EXIT_CANCELLED


def _main(args) -> int:
    t0 = time.monotonic()
    try:
        data = load_workflow(args.workflow)
        fmt = workflow_format(data)
    except WorkflowError as e:
        _err(str(e))
        return EXIT_USAGE
    for folder in args.models:
        if not os.path.isdir(folder):
            _err(f"--models {folder}: no such folder")
            return EXIT_USAGE

    try:
        ranks.start(args)  # under torchrun: this process's GPU and the process group (else nothing)
    except ranks.LaunchError as e:
        _err(str(e))
        return EXIT_USAGE

    # boot the host (quietly: import warnings about optional extras are noise here)
    if not args.verbose:
        logging.disable(logging.WARNING)
    try:
        nodes = comfy_host.boot(comfyui=args.comfyui, cpu=True if args.cpu else None,
                                output_directory=args.output_directory, extra_model_dirs=tuple(args.models),
                                quiet=not args.verbose)
    except comfy_host.HostNotFound as e:
        _err(str(e))
        return EXIT_USAGE
    finally:
        logging.disable(logging.NOTSET)
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    classes = nodes.NODE_CLASS_MAPPINGS
    display = getattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", {})
    import folder_paths
    for folder in args.models:
        kinds = [k for k in os.listdir(folder) if os.path.isdir(os.path.join(folder, k))]
        if not args.quiet and not any(k in folder_paths.folder_names_and_paths for k in kinds):
            print(f"warning: --models {folder} has no checkpoints/, loras/, vae/, … subfolder", file=sys.stderr)

    try:
        if fmt == "ui":
            api, notes = convert_ui(data, classes, display)
        else:
            api, notes = api_graph(data), []
            for nid, node in api.items():
                if node["class_type"] not in classes:
                    close = difflib.get_close_matches(str(node["class_type"]), list(classes), n=3, cutoff=0.7)
                    hint = f" (close: {', '.join(close)})" if close else " (is its custom node pack installed?)"
                    raise WorkflowError(f"node {nid} has class_type '{node['class_type']}', which this ComfyUI "
                                        f"does not have{hint}")
        apply_sets(api, args.sets, classes, display)
    except WorkflowError as e:
        _err(str(e))
        return EXIT_USAGE
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        if args.verbose:
            raise
        _err(f"malformed {fmt.upper()}-format workflow ({type(e).__name__}: {e}); --verbose shows where")
        return EXIT_USAGE
    if not args.quiet:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)

    if args.print_api:
        print(json.dumps(api, indent=2, ensure_ascii=False))
    return _validate_and_run(args, api, data if fmt == "ui" else None, classes, display, t0)


def _validate_and_run(args, api, ui_workflow, classes, display, t0) -> int:
    import asyncio

    import comfy.model_management
    import comfy.utils
    import execution
    import folder_paths
    import server
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    labels = {nid: _label(api, nid, classes, display) for nid in api}
    progress = ProgressDisplay(sys.stderr, enabled=not args.quiet, labels=labels)
    state = _RunState(api=api, labels=labels, progress=progress)
    out_dir = folder_paths.get_output_directory()

    def on_event(event, data):
        if event == "executing" and data.get("node") is not None:
            nid = str(data["node"])
            shown = str(data.get("display_node") or nid)
            state.current = shown
            if state.cancelled:  # a node swallowed the interrupt: stop before the next one
                comfy.model_management.interrupt_current_processing(True)
            if nid in api:  # (nodes that a node expands into at run time are not announced)
                state.executed_count += 1
                progress.message(f"[{state.executed_count}/{state.to_run}] {labels.get(nid, '#' + nid)}")
        elif event == "executed":
            state.ui_files.extend(_ui_output_files(data.get("output")))
        elif event == "progress_text" and not args.quiet:
            progress.message(f"  {data.get('text')}")

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if node_id is None:
            node_id = ctx.node_id if ctx is not None else fake_server.last_node_id
        if state.cancelled:
            raise comfy.model_management.InterruptProcessingException()
        comfy.model_management.throw_exception_if_processing_interrupted()
        try:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        except Exception:  # the progress registry is the UI's; never let it break a node
            pass
        progress.update(node_id, value, total)

    def on_sigint(signum, frame):
        if state.cancelled:
            progress.end_line()
            print("cancelled (second Ctrl-C): exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_CANCELLED)
        state.cancelled = True
        comfy.model_management.interrupt_current_processing(True)
        progress.end_line()
        print("cancelling… (the running node stops at its next check; Ctrl-C again to exit now)",
              file=sys.stderr, flush=True)

    fake_server = HeadlessServer(on_event)
    saved_instance = getattr(server.PromptServer, "instance", None)
    saved_hook = comfy.utils.PROGRESS_BAR_HOOK
    saved_pbar = comfy.utils.PROGRESS_BAR_ENABLED
    in_main = threading.current_thread() is threading.main_thread()
    saved_sigint = signal.getsignal(signal.SIGINT) if in_main else None
    log_filter = None if args.verbose else _DropExecutorErrors()
    root = logging.getLogger()
    if log_filter:
        root.addFilter(log_filter)
    if args.quiet and not args.verbose:
        logging.disable(logging.WARNING)
    server.PromptServer.instance = fake_server
    comfy.utils.set_progress_bar_global_hook(hook)
    comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars of the samplers' own: ours instead
    if in_main:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        prompt_id = str(uuid.uuid4())
        try:
            valid, error, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, api, None))
        except Exception as e:  # noqa: BLE001  (a node's INPUT_TYPES/VALIDATE_INPUTS raising)
            _err(f"validation failed: {type(e).__name__}: {e}")
            return EXIT_FAILED
        if not valid or node_errors:
            lines = _validation_messages(api, error, node_errors, classes, display)
            _err("the workflow is not valid:" if len(lines) > 1 else lines[0])
            if len(lines) > 1:
                for line in lines:
                    print(f"  {line}", file=sys.stderr)
            return EXIT_FAILED
        try:
            good_outputs = ranks.outputs_for_rank(api, good_outputs)  # torchrun: ranks > 0 stop after the trajectories
        except ranks.LaunchError as e:
            _err(str(e))
            return EXIT_USAGE
        if args.print_api:
            return EXIT_OK
        if state.cancelled:
            _err("cancelled before execution started")
            return EXIT_CANCELLED

        before = _snapshot(out_dir)
        state.to_run = _reachable(api, good_outputs)
        extra_data = {"client_id": "headless"}
        if ui_workflow is not None:
            extra_data["extra_pnginfo"] = {"workflow": ui_workflow}  # saved images embed it, as in the UI
        fake_server.last_prompt_id = prompt_id
        executor = execution.PromptExecutor(fake_server, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0})
        executor.execute(api, prompt_id, extra_data, good_outputs)
        progress.end_line()

        messages = executor.status_messages
        interrupted = [d for ev, d in messages if ev == "execution_interrupted"]
        failures = [d for ev, d in messages if ev == "execution_error"]
        if state.cancelled or interrupted:
            where = interrupted[0].get("node_id") if interrupted else state.current
            _err(f"cancelled during {_node_ref(api, where, classes, display)}" if where else "cancelled")
            return EXIT_CANCELLED
        if failures or not executor.success:
            if failures:
                _err(_error_message(api, failures[0], classes, display))
            else:
                _err("execution failed")
            return EXIT_FAILED

        files = list(dict.fromkeys(os.path.abspath(f) for f in state.ui_files))
        after = _snapshot(out_dir) if before is not None else None
        if after is not None:
            for p, sig in sorted(after.items()):
                if before.get(p) != sig and os.path.abspath(p) not in files:
                    files.append(os.path.abspath(p))
        elapsed = time.monotonic() - t0
        if args.quiet:
            for f in files:
                print(f)
        else:
            if files:
                print(f"wrote {len(files)} file{'s' if len(files) != 1 else ''}:")
                for f in files:
                    print(f"  {f}")
            else:
                print("the workflow ran; it reported no output files")
            print(f"done in {elapsed:.1f} s")
        sys.stdout.flush()
        return EXIT_OK
    finally:
        progress.end_line()
        if in_main:
            signal.signal(signal.SIGINT, saved_sigint)
        comfy.utils.set_progress_bar_global_hook(saved_hook)
        comfy.utils.set_progress_bar_enabled(saved_pbar)
        server.PromptServer.instance = saved_instance
        comfy.model_management.interrupt_current_processing(False)
        if log_filter:
            root.removeFilter(log_filter)
        if args.quiet and not args.verbose:
            logging.disable(logging.NOTSET)


if __name__ == "__main__":
    sys.exit(main())
