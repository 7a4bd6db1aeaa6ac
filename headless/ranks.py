"""headless/run.py under torchrun: one workflow in several processes that make one trajectory set.

    torchrun --nproc-per-node 2 headless/run.py workflow.json
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id ID \\
        headless/run.py workflow.json --output-directory /shared/output     # on each machine

Every rank runs the nodes the Teacher Trajectories node needs (its ancestors: loading the teacher)
and computes its share of the batches (comfy_rapm/trajectories.py); only rank 0 runs the whole
workflow, so whatever follows the trajectories (training: one GPU, batch 1) runs once. Ranks other
than 0 print only errors (and the files they wrote), unless --verbose.

Device: each process uses the LOCAL_RANK-th GPU of those visible. Before torch starts CUDA in the
process, CUDA_VISIBLE_DEVICES is narrowed to that one GPU (what ComfyUI's --cuda-device does), so
every process sees its GPU as cuda:0 and creates no context on the others. With --cpu, or where no
GPU is visible, the ranks compute on the CPU.

The process group is gloo, on GPUs too: the ranks exchange only a few kilobytes of JSON (which shards
are done, each rank's result) as CPU tensors, never a GPU tensor, and gloo's barrier names the ranks
that did not arrive; an NCCL group would add a communicator per GPU (and its network set-up across
machines) for no data. Its timeout (--dist-timeout) bounds every wait of one rank for the others."""
from __future__ import annotations

import atexit
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

from headless.workflow import ancestors

TRAJECTORY_NODE = "RAPMTeacherTrajectory"
DEFAULT_TIMEOUT_S = 1800.0


class LaunchError(Exception):
    """A problem with how the processes were started; reported as one line, exit code 2."""


@dataclass
class Launch:
    rank: int
    world: int
    local_rank: int
    device: str

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world}"


_launch: Launch | None = None


def add_arguments(parser) -> None:
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others (loading the teacher, the last "
                             f"batches) before it gives up naming the ranks that did not come (default {DEFAULT_TIMEOUT_S:.0f})")


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        if default is None:
            raise LaunchError(f"{name} is not set: start several processes with torchrun "
                              "(torchrun --nproc-per-node K headless/run.py workflow.json)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer (it is set by torchrun)") from None


def select_gpu(local_rank: int) -> str:
    """Narrow CUDA_VISIBLE_DEVICES to this process's GPU (before torch starts CUDA); returns what it chose."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank)
        return f"GPU {local_rank}"
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if not ids:
        return "cpu (CUDA_VISIBLE_DEVICES is empty)"
    if local_rank >= len(ids):
        raise LaunchError(f"LOCAL_RANK {local_rank}, but CUDA_VISIBLE_DEVICES={visible} lists {len(ids)} GPU(s): start "
                          f"at most {len(ids)} processes on this machine (--nproc-per-node), or pass --cpu")
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank]
    return f"GPU {ids[local_rank]}"


def start(args) -> Launch | None:
    """Before the host boots: when torchrun started this process as one of several (WORLD_SIZE > 1),
    pick its device, join the process group and check that every rank has one of the same kind.
    None (and nothing changed) otherwise. Raises LaunchError."""
    global _launch
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    timeout = float(getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
    if not timeout > 0:
        raise LaunchError(f"--dist-timeout {timeout:g}: give a number of seconds above 0")
    torch_module = sys.modules.get("torch")
    if not args.cpu and torch_module is not None and torch_module.cuda.is_initialized():
        raise LaunchError("CUDA was started in this process before headless/ranks.py chose its GPU: call ranks.start() "
                          "before anything touches CUDA")
    chosen = "cpu (--cpu)" if args.cpu else select_gpu(local_rank)
    if rank > 0 and not args.verbose:
        args.quiet = True  # one progress display: rank 0's
    import torch
    import torch.distributed as dist
    use_cuda = not args.cpu and torch.cuda.is_available()
    if not dist.is_available():
        raise LaunchError("this torch has no torch.distributed: run one process (python headless/run.py …)")
    if use_cuda:
        torch.cuda.set_device(0)  # the one GPU this process sees
    kinds = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    try:
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout))
        atexit.register(_shutdown)
        dist.all_gather(kinds, torch.tensor([1 if use_cuda else 0], dtype=torch.int64))
    except RuntimeError as e:  # (torch's store and backend errors derive from it)
        raise LaunchError(f"rank {rank} of {world}: the other ranks did not join within {timeout:.0f} s "
                          f"({' '.join(str(e).split())[:300]})") from None
    device = f"{chosen} ({torch.cuda.get_device_name(0)})" if use_cuda else "cpu"
    without = [r for r, k in enumerate(kinds) if not int(k)]
    if 0 < len(without) < world:
        raise LaunchError(f"rank(s) {', '.join(map(str, without))} have no GPU while the others use one: start at most "
                          "as many processes per machine as it has GPUs (--nproc-per-node), or pass --cpu to all")
    _launch = Launch(rank=rank, world=world, local_rank=local_rank, device=device)
    if not args.quiet:
        print(f"{_launch.label} on {socket.gethostname()}: {device}", file=sys.stderr, flush=True)
    return _launch


def _shutdown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> None:
    """Under torchrun, end this process now with `code`, without the interpreter's teardown: a rank that had finished
    its work was seen (once in CI) to abort in it ("terminate called without an active exception", SIGABRT) and so to
    fail a run whose files were all written. Every file the runner writes is complete (atomic) before this point;
    the OS closes the group's connections. Does nothing in a one-process run."""
    if _launch is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def outputs_for_rank(api: dict, outputs: list, launch: Launch | None = None) -> list:
    """The output nodes this process executes: all of them alone or on rank 0; on other ranks the
    Teacher Trajectories nodes only (the executor then runs just their ancestors). Raises
    LaunchError for a workflow several processes cannot share."""
    launch = _launch if launch is None else launch
    if launch is None:
        return outputs
    reachable = ancestors(api, outputs)
    trajectory_nodes = sorted((nid for nid in reachable if api[nid]["class_type"] == TRAJECTORY_NODE),
                              key=lambda n: (len(n), n))
    if len(trajectory_nodes) > 1:
        raise LaunchError(f"under torchrun a workflow may have one Teacher Trajectories node; this one has "
                          f"{len(trajectory_nodes)} (nodes {', '.join(trajectory_nodes)}): make the sets one workflow at "
                          "a time (mute the others), then run the rest of the workflow")
    if not trajectory_nodes and launch.rank == 0:
        print(f"warning: {launch.world} processes, but the workflow has no Teacher Trajectories node: rank 0 runs "
              "it alone and the others have nothing to do", file=sys.stderr, flush=True)
    if launch.rank == 0:
        return outputs
    return trajectory_nodes
