"""Run a ComfyUI workflow file (UI or API format) through ComfyUI's own executor, in-process.

    python headless/run.py workflow.json [--set "KSampler.seed=7"] [--output-directory out/]
                                         [--models models/] [--cpu] [--print-api] [--quiet]

A UI-format file (what the ComfyUI page saves) is converted to the API format as the front end does
when you press Queue (headless/convert.py), then validated and executed by the host's own executor
(headless/execute.py). Every file the run writes, temporary ones (previews, loss graphs) included,
goes under --output-directory and is listed at the end.

Exit codes: 0 success, 1 validation or execution error, 2 bad file / bad option / host not found or
unsupported, 130 cancelled with Ctrl-C (the running node is interrupted at its next check; a second
Ctrl-C exits at once).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python headless/run.py
    _repo = str(Path(__file__).resolve().parent.parent)
    if _repo not in sys.path:
        sys.path.insert(0, _repo)

from headless import comfy_host, ranks  # noqa: E402
from headless.convert import WorkflowError, convert_ui, ui_to_api  # noqa: E402,F401  (ui_to_api: the API)
from headless.execute import EXIT_CANCELLED, EXIT_OK, EXIT_USAGE, error, validate_and_run  # noqa: E402
from headless.workflow import api_graph, apply_sets, check_node_types, load_workflow, workflow_format  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="headless/run.py",
        description="Run a ComfyUI workflow (UI or API format) through ComfyUI's own executor, in-process.")
    p.add_argument("workflow", help="workflow .json file (saved from the ComfyUI page, or an API-format export)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set an input; NODE is a node title or id; VALUE is parsed as JSON if it parses, "
                        "else taken as a string (repeatable)")
    p.add_argument("--output-directory",
                   help="where the run writes (Save* nodes; temporary files go to its temp/); default: ComfyUI's")
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


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 1 invalid/failed, 2 bad input, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is installed
        print(file=sys.stderr)
        error("cancelled")
        return EXIT_CANCELLED


def _main(args) -> int:
    t0 = time.monotonic()
    try:
        data = load_workflow(args.workflow)
        fmt = workflow_format(data)
    except WorkflowError as e:
        error(str(e))
        return EXIT_USAGE
    for folder in args.models:
        if not os.path.isdir(folder):
            error(f"--models {folder}: no such folder")
            return EXIT_USAGE

    try:
        ranks.start(args)  # under torchrun: this process's GPU and the process group (else nothing)
    except ranks.LaunchError as e:
        error(str(e))
        return EXIT_USAGE

    if not args.verbose:  # import warnings about the host's optional extras are noise here
        logging.disable(logging.WARNING)
    try:
        nodes = comfy_host.boot(comfyui=args.comfyui, cpu=True if args.cpu else None,
                                output_directory=args.output_directory, extra_model_dirs=tuple(args.models),
                                quiet=not args.verbose)
    except (comfy_host.HostNotFound, comfy_host.HostUnsupported) as e:
        error(str(e))
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
            check_node_types(api, classes)
        apply_sets(api, args.sets, classes, display)
    except WorkflowError as e:
        error(str(e))
        return EXIT_USAGE
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        if args.verbose:
            raise
        error(f"malformed {fmt.upper()}-format workflow ({type(e).__name__}: {e}); --verbose shows where")
        return EXIT_USAGE
    if not args.quiet:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    if args.print_api:
        print(json.dumps(api, indent=2, ensure_ascii=False))

    try:
        code, files = validate_and_run(api, data if fmt == "ui" else None, classes, display, quiet=args.quiet,
                                       verbose=args.verbose, validate_only=args.print_api,
                                       select_outputs=ranks.outputs_for_rank)  # torchrun: ranks > 0 stop after the trajectories
    except ranks.LaunchError as e:
        error(str(e))
        return EXIT_USAGE
    if code != EXIT_OK or args.print_api:
        return code
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
        print(f"done in {time.monotonic() - t0:.1f} s")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    status = main()
    ranks.leave(status)  # torchrun: no interpreter teardown (headless/ranks.py)
    sys.exit(status)
