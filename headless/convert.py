"""Workflow files for headless runs: reading them, UI format → API format, and `--set`.

UI-format files (what the ComfyUI page saves: `nodes` + `links`, widget values by position) are
converted to the API format (`{id: {class_type, inputs}}`) from the installed nodes' own
INPUT_TYPES, the way the ComfyUI front end does it when you press Queue: UI-only nodes (Note,
Reroute, PrimitiveNode) are dropped and resolved into their targets, muted nodes are skipped,
bypassed nodes pass their first input of the matching type through, and the seed widgets'
"control after generate" values are dropped. Plain Python: no ComfyUI import."""
from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass

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
# UI -> API conversion

@dataclass
class _Link:
    origin: str
    origin_slot: int
    target: str
    target_slot: int
    type: object = None


def display_name(class_type: str, node_classes: dict, display_names: dict | None) -> str:
    if display_names and class_type in display_names:
        return display_names[class_type]
    cls = node_classes.get(class_type)
    return getattr(cls, "DISPLAY_NAME", None) or class_type


def spec_entries(cls) -> list[tuple[str, object, dict]]:
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


def is_combo(kind, opts) -> bool:
    return isinstance(kind, (list, tuple)) or (isinstance(kind, str) and kind == "COMBO")


def combo_options(kind, opts) -> list:
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
    return is_combo(kind, opts) or (isinstance(kind, str) and kind in WIDGET_TYPES)


def _has_control(name, kind, opts) -> bool:
    if opts.get("control_after_generate"):
        return True
    return isinstance(kind, str) and kind == "INT" and name in SEED_NAMES


def _widget_default(kind, opts):
    if "default" in opts:
        return opts["default"]
    if is_combo(kind, opts):
        options = combo_options(kind, opts)
        return options[0] if options else _MISSING
    return _MISSING


def widget_slots(cls) -> list[str]:
    """The node's widgets_values slots as the front end saves them: each widget input in declared order, and
    'control_after_generate' after a seed-like INT."""
    names = []
    for name, kind, opts in spec_entries(cls):
        if _is_widget(name, kind, opts, None):
            names.append(name)
            if _has_control(name, kind, opts):
                names.append("control_after_generate")
    return names


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
        return node.get("title") or display_name(node["type"], self.classes, self.display_names)

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
        entries = spec_entries(cls)
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
                return nxt is not None and is_combo(nxt[1], nxt[2]) and v in combo_options(nxt[1], nxt[2])

            # "control after generate" value the UI stores after seed-like widgets
            if i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES:
                is_int = isinstance(kind, str) and kind == "INT"
                if _has_control(name, kind, opts) or (is_int and not valid_for_next(values[i])):
                    i += 1
                    # combo controls carry a filter-list string too
                    if (is_combo(kind, opts) and i < len(values) and isinstance(values[i], str)
                            and len(values) - i > remaining):
                        i += 1
                    continue
            # the upload button's value after an upload combo (LoadImage: ["example.png", "image"])
            if (is_combo(kind, opts) and any(opts.get(f) for f in UPLOAD_FLAGS) and i < len(values)
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
