"""Running an API graph through the host's own executor in this process: validation messages that
name the node and input, a terminal progress bar, Ctrl-C as Cancel, and the list of files written.

What this uses of the host is what stays put between releases: `execution.validate_prompt`, the
executor built by comfy_host.new_executor (feature detection), its status messages, the global
progress hook and the interrupt flag. Ctrl-C sets the host's interrupt flag, which every node that
checks it (samplers, this pack's nodes each step) turns into the host's interrupt exception; it
does not depend on how often the host calls the progress hook."""
from __future__ import annotations

import asyncio
import difflib
import logging
import os
import shutil
import signal
import sys
import threading
import uuid
from dataclasses import dataclass, field

from comfy_rapm.progress import Clock, format_duration
from headless import comfy_host
from headless.convert import combo_options, is_combo, spec_entries
from headless.workflow import ancestors, node_title

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


# --- terminal output ---------------------------------------------------------------------------

class ProgressDisplay:
    """One bar per node that reports progress: an updating line on a TTY, periodic lines otherwise."""

    def __init__(self, stream, enabled: bool, labels: dict[str, str]):
        self.stream, self.enabled, self.labels = stream, enabled, labels
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.key, self.clock = None, None
        self.last_value, self.last_draw, self.last_quarter = -1.0, 0.0, -1
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
        key, total = str(node_id), total or 0
        if key != self.key or value < self.last_value:
            self.end_line()
            self.key, self.clock = key, Clock(total, value)
            self.last_draw, self.last_quarter = 0.0, -1
        self.clock.total, self.last_value = total, value
        done = total and value >= total
        frac = min(1.0, value / total) if total else 0.0
        rate_eta = self.clock.rate_and_eta(value)
        if done:
            rate_eta = rate_eta[:1] + [format_duration(self.clock.elapsed())]
        tail = " ".join(rate_eta) or "ETA --"
        label = self.labels.get(key, f"#{key}")
        count = f"{value:g}/{total:g}" if total else f"{value:g}"
        now = self.clock.elapsed()
        if self.tty:
            if not done and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            width = shutil.get_terminal_size((100, 20)).columns
            head, tail_text = f"  {label} ", f" {count} {frac * 100:3.0f}% {tail}"
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
                print(f"  {label}: {count} ({frac * 100:.0f}%) {tail}", file=self.stream, flush=True)


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


# --- what the run reports ----------------------------------------------------------------------

def node_ref(api: dict, node_id, node_classes, display_names, prefix: str = "node ", quote: str = "'") -> str:
    """How messages name a node: "node 3 'RAPM Train'" (or "#3 RAPM Train" for the progress lines), with its
    class when the title is not the class name."""
    node = api.get(str(node_id))
    if node is None:
        return f"{prefix}{node_id}"
    title = node_title(api, str(node_id), node_classes, display_names)
    return f"{prefix}{node_id} {quote}{title}{quote}" + ("" if title == node["class_type"] else f" ({node['class_type']})")


def label(api: dict, node_id, node_classes, display_names) -> str:
    return node_ref(api, node_id, node_classes, display_names, prefix="#", quote="")


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


def _snapshot(directories: list[str], limit: int = 50000) -> dict | None:
    out = {}
    for directory in dict.fromkeys(directories):
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
        ref = node_ref(api, node_id, node_classes, display_names)
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
    for n, kind, opts in spec_entries(cls):
        if n == name and is_combo(kind, opts):
            options = [str(o) for o in combo_options(kind, opts)]
            if not options:
                return " (the list is empty: is the model folder registered? see --models)"
            close = difflib.get_close_matches(str(received), options, n=3, cutoff=0.5)
            return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ""


def _error_message(api, data, node_classes, display_names) -> str:
    ref = node_ref(api, data.get("node_id"), node_classes, display_names)
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


# --- running -----------------------------------------------------------------------------------

@dataclass
class _RunState:
    cancelled: bool = False
    ui_files: list = field(default_factory=list)
    executed_count: int = 0
    to_run: int = 0
    current: str | None = None


def validate_and_run(api: dict, ui_workflow: dict | None, classes: dict, display: dict, *, quiet: bool = False,
                     verbose: bool = False, validate_only: bool = False,
                     select_outputs=lambda api, outputs: outputs) -> tuple[int, list[str]]:
    """Validate `api` and (unless validate_only) execute the outputs `select_outputs` keeps of the valid ones.
    Returns (exit code, files written); messages go to stderr, naming the node and input."""
    import comfy.model_management
    import comfy.utils
    import execution
    import folder_paths
    import server
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    labels = {nid: label(api, nid, classes, display) for nid in api}
    progress = ProgressDisplay(sys.stderr, enabled=not quiet, labels=labels)
    state = _RunState()

    def on_event(event, data):
        if event == "executing" and data.get("node") is not None:
            nid = str(data["node"])
            state.current = str(data.get("display_node") or nid)
            if state.cancelled:  # a node swallowed the interrupt: stop before the next one
                comfy.model_management.interrupt_current_processing(True)
            if nid in api:  # (nodes that a node expands into at run time are not announced)
                state.executed_count += 1
                progress.message(f"[{state.executed_count}/{state.to_run}] {labels.get(nid, '#' + nid)}")
        elif event == "executed":
            state.ui_files.extend(_ui_output_files(data.get("output")))
        elif event == "progress_text" and not quiet:
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
    saved_hook, saved_pbar = comfy.utils.PROGRESS_BAR_HOOK, comfy.utils.PROGRESS_BAR_ENABLED
    in_main = threading.current_thread() is threading.main_thread()
    saved_sigint = signal.getsignal(signal.SIGINT) if in_main else None
    log_filter = None if verbose else _DropExecutorErrors()
    root = logging.getLogger()
    if log_filter:
        root.addFilter(log_filter)
    if quiet and not verbose:
        logging.disable(logging.WARNING)
    server.PromptServer.instance = fake_server
    comfy.utils.set_progress_bar_global_hook(hook)
    comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars of the samplers' own: ours instead
    if in_main:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        prompt_id = str(uuid.uuid4())
        try:
            valid, err, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, api, None))
        except Exception as e:  # noqa: BLE001  (a node's INPUT_TYPES/VALIDATE_INPUTS raising)
            error(f"validation failed: {type(e).__name__}: {e}")
            return EXIT_FAILED, []
        if not valid or node_errors:
            lines = _validation_messages(api, err, node_errors, classes, display)
            error("the workflow is not valid:" if len(lines) > 1 else lines[0])
            if len(lines) > 1:
                for line in lines:
                    print(f"  {line}", file=sys.stderr)
            return EXIT_FAILED, []
        good_outputs = select_outputs(api, good_outputs)
        if validate_only:
            return EXIT_OK, []
        if state.cancelled:
            error("cancelled before execution started")
            return EXIT_CANCELLED, []
        try:
            executor = comfy_host.new_executor(fake_server)
        except comfy_host.HostUnsupported as e:
            error(str(e))
            return EXIT_USAGE, []

        watched = [folder_paths.get_output_directory(), folder_paths.get_temp_directory()]
        before = _snapshot(watched)
        state.to_run = len(ancestors(api, good_outputs))
        extra_data = {"client_id": "headless"}
        if ui_workflow is not None:
            extra_data["extra_pnginfo"] = {"workflow": ui_workflow}  # saved images embed it, as in the UI
        fake_server.last_prompt_id = prompt_id
        executor.execute(api, prompt_id, extra_data, good_outputs)
        progress.end_line()

        messages = executor.status_messages
        interrupted = [d for ev, d in messages if ev == "execution_interrupted"]
        failures = [d for ev, d in messages if ev == "execution_error"]
        if state.cancelled or interrupted:
            where = interrupted[0].get("node_id") if interrupted else state.current
            error(f"cancelled during {node_ref(api, where, classes, display)}" if where else "cancelled")
            return EXIT_CANCELLED, []
        if failures or not executor.success:
            error(_error_message(api, failures[0], classes, display) if failures else "execution failed")
            return EXIT_FAILED, []

        files = list(dict.fromkeys(os.path.abspath(f) for f in state.ui_files))
        after = _snapshot(watched) if before is not None else None
        for p, sig in sorted((after or {}).items()):
            if before.get(p) != sig and os.path.abspath(p) not in files:
                files.append(os.path.abspath(p))
        return EXIT_OK, files
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
        if quiet and not verbose:
            logging.disable(logging.NOTSET)
