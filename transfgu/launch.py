"""How a distributed stage starts its processes: `launcher.backend` in params.yaml.

- local: torchrun on this machine (`launcher.nproc_per_node` processes; with `launcher.nnodes` > 1 the c10d
  rendezvous at `launcher.rdzv_endpoint`, the same command started by hand on every machine).
- slurm: inside a Slurm allocation (`sbatch` / `salloc`), from the first node: one `srun` task per node of the
  allocation, each a torchrun agent; the node rank from Slurm (SLURM_PROCID: with one task per node, the node's
  index), the rendezvous on the first node (node rank 0), `launcher.nproc_per_node` processes per node
  (`auto`: the GPUs Slurm gave). `srun --kill-on-bad-exit=1`: a rank that fails on any node ends the step.
  The rendezvous is torchrun's `static` one: its c10d rendezvous ignores --node_rank and ranks the nodes by
  host name and process id, while the static one gives node rank r to srun's task r.
- auto (default): slurm inside an allocation of more than one node (SLURM_JOB_ID set, SLURM_JOB_NUM_NODES > 1),
  else local. Outside Slurm, auto is local.

Two environment variables exist for testing on one machine (tests/test_distributed.py):
TRANSFGU_SLURM_TASKS_AS_NODES=1 lets each task of the allocation stand for a node (`srun -n SLURM_NTASKS`
without one task per node), TRANSFGU_RDZV_HOST overrides the rendezvous host (e.g. 127.0.0.1)."""
from __future__ import annotations

import os
import re
import socket
import sys
import zlib
from dataclasses import dataclass

from .errors import InputValueError

TASKS_AS_NODES_ENV = "TRANSFGU_SLURM_TASKS_AS_NODES"
RDZV_HOST_ENV = "TRANSFGU_RDZV_HOST"
# each srun task: a torchrun agent whose node rank is the task's rank (expanded by the task's own shell)
AGENT = 'exec "$0" -m torch.distributed.run --node_rank="$SLURM_PROCID" "$@"'


@dataclass(frozen=True)
class Plan:
    """Where a distributed stage's processes run: the backend ('local' or 'slurm'), nodes x processes per node."""
    backend: str
    nodes: int
    nproc_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.nproc_per_node


def in_slurm(env=os.environ) -> bool:
    """Whether this process runs inside a Slurm allocation."""
    return bool(env.get("SLURM_JOB_ID"))


def slurm_nodes(env=os.environ) -> int:
    """The allocation's nodes (SLURM_JOB_NUM_NODES, older Slurm SLURM_NNODES); its tasks (SLURM_NTASKS) where
    TRANSFGU_SLURM_TASKS_AS_NODES is set (tests: one machine whose tasks stand for nodes)."""
    if env.get(TASKS_AS_NODES_ENV):
        return int(env.get("SLURM_NTASKS") or 1)
    return int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)


def gpus_per_node(slurm: bool, env=os.environ) -> int:
    """The GPUs of a node (at least 1 process): under Slurm the ones it gave the job on this node
    (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES), locally the ones torch sees."""
    if slurm:
        if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
            return max(1, int(env["SLURM_GPUS_ON_NODE"]))
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return max(1, len(visible))
    import torch
    return max(1, torch.cuda.device_count())


def plan(launcher, env=os.environ) -> Plan:
    """The Plan of params.yaml's `launcher` section in this environment."""
    backend = launcher.backend
    if backend == "auto":
        backend = "slurm" if in_slurm(env) and slurm_nodes(env) > 1 else "local"
    if backend == "slurm" and not in_slurm(env):
        raise InputValueError("params.yaml: launcher.backend is slurm but this is not a Slurm allocation "
                              "(SLURM_JOB_ID is unset): run `dvc repro` inside sbatch / salloc, or set "
                              "launcher.backend: auto")
    slurm = backend == "slurm"
    nproc = launcher.nproc_per_node
    if nproc == "auto":
        nproc = gpus_per_node(slurm, env)
    return Plan(backend, slurm_nodes(env) if slurm else launcher.nnodes, nproc)


def first_node(nodelist: str) -> str:
    """The first host of a Slurm host list (SLURM_JOB_NODELIST), as `scontrol show hostnames` lists it first:
    'gpu[007-010,012],cpu1' -> 'gpu007', 'rack[1-2]-n[01-04]' -> 'rack1-n01'."""
    head = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not head:
        raise InputValueError(f"SLURM_JOB_NODELIST={nodelist!r}: not a Slurm host list")
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", head.group(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous(env=os.environ, cwd: str | None = None) -> str:
    """host:port of the rendezvous under Slurm. Host: TRANSFGU_RDZV_HOST, else the allocation's first node.
    Port: a free one when this process runs on that host (`dvc repro` in an sbatch script runs on the first
    node), else one derived from the job id and the project folder (another experiment, in another folder or
    another job, gets another port)."""
    first = first_node(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
    host = env.get(RDZV_HOST_ENV) or first
    here = host in ("127.0.0.1", "localhost", "::1") or (env.get("SLURMD_NODENAME") == first and host == first)
    if here:
        port = _free_port()
    else:
        port = 20000 + zlib.crc32(f"{env.get('SLURM_JOB_ID')}:{cwd or os.getcwd()}".encode()) % 20000
    return f"{host}:{port}"


def local_command(plan_: Plan, launcher, script: str, argv=()) -> list:
    """torchrun on this machine: one node standalone, several through launcher.rdzv_endpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={plan_.nproc_per_node}",
           "--max_restarts=0"]
    if plan_.nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={plan_.nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={launcher.rdzv_endpoint}",
                f"--rdzv_id={launcher.rdzv_id}"]
    return [*cmd, script, *argv]


def slurm_command(plan_: Plan, script: str, argv=(), env=os.environ) -> list:
    """srun: one task per node (per task with TRANSFGU_SLURM_TASKS_AS_NODES), each a torchrun agent of
    nproc_per_node processes, node rank SLURM_PROCID, the static rendezvous on the first node (node rank 0)."""
    n = plan_.nodes
    placement = ([f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1"] if not env.get(TASKS_AS_NODES_ENV)
                 else ["--nodes=1", f"--ntasks={n}"])
    # --cpu-bind=none: an agent's processes (and their DataLoader workers) may use every CPU the job has on the
    # node; a step asking for no GPUs gets all the job's GPUs (man srun, --gres)
    return ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", *placement, "bash", "-c", AGENT, sys.executable,
            f"--nnodes={n}", f"--nproc_per_node={plan_.nproc_per_node}", "--max_restarts=0",
            "--rdzv_backend=static", f"--rdzv_endpoint={rendezvous(env)}", f"--rdzv_id={env.get('SLURM_JOB_ID')}",
            script, *argv]


def command(launcher, script: str, argv=(), env=os.environ) -> list | None:
    """The command that runs `script` in the planned processes, or None for one process (run it directly)."""
    p = plan(launcher, env)
    if p.world == 1:
        return None
    return slurm_command(p, script, argv, env) if p.backend == "slurm" else local_command(p, launcher, script, argv)
