"""A workflow file for headless runs: reading it (UI or API format, one-line errors) and `--set`
edits to its API graph. Plain Python: no ComfyUI import."""
from __future__ import annotations

import difflib
import json
import sys

from headless.convert import WorkflowError, display_name, spec_entries

# --- reading the file -------------------------------------------------------------------------

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


# --- --set -------------------------------------------------------------------------------------

def node_title(api: dict, node_id: str, node_classes: dict, display_names: dict | None) -> str:
    """The title a node shows in the UI: its own, else its class's display name."""
    node = api[node_id]
    return (node.get("_meta") or {}).get("title") or display_name(node["class_type"], node_classes, display_names)


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
        titles = {nid: node_title(api, nid, node_classes, display_names) for nid in api}
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
        valid = [n for n, _, _ in spec_entries(cls)] if cls is not None else []
        valid += [n for n in node["inputs"] if n not in valid]
        if input_name not in valid:
            raise WorkflowError(f"--set {item!r}: node {ids[0]} '{titles[ids[0]]}' ({node['class_type']}) has no "
                                f"input '{input_name}'; {_close_list(input_name, valid)}")
        node["inputs"][input_name] = _parse_value(raw, api)


def check_node_types(api: dict, node_classes: dict) -> None:
    """Every node of an API graph names an installed node type (WorkflowError naming the closest ones)."""
    for nid, node in api.items():
        if node["class_type"] not in node_classes:
            close = difflib.get_close_matches(str(node["class_type"]), list(node_classes), n=3, cutoff=0.7)
            hint = f" (close: {', '.join(close)})" if close else " (is its custom node pack installed?)"
            raise WorkflowError(f"node {nid} has class_type '{node['class_type']}', which this ComfyUI does not "
                                f"have{hint}")


def ancestors(api: dict, outputs) -> set[str]:
    """The ids of `outputs` and every node they take an input from, directly or not."""
    seen, stack = set(), [str(o) for o in outputs]
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in api:
            continue
        seen.add(nid)
        for value in api[nid]["inputs"].values():
            if isinstance(value, list) and len(value) == 2:
                stack.append(str(value[0]))
    return seen
