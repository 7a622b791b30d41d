"""What every entry point shares: the stages (`run_stage`), `transfgu predict` and `transfgu pretrain`
(`one_line_errors`).

A stage script is `run_stage("extract", main)`, where main(stage) reads `stage.params` (the typed params.yaml,
transfgu.config) and the stage's files (`stage.dep(...)`, `stage.out(...)`), calls the library and writes its
outs. `run_stage` does the rest:
- under `launcher.nproc_per_node x nnodes > 1`, a distributed stage re-starts itself under torchrun (one node:
  `--standalone`; several: the c10d rendezvous at launcher.rdzv_endpoint, the same command on every node);
  inside a Slurm allocation of several nodes (launcher.backend), under srun: a torchrun agent on every node;
- joins the process group, configures logging, reads and checks params.yaml once (and the split index against
  it), seeds everything;
- ends any expected error (transfgu.errors.BadInput, a failed write for the disk's sake) with one line and exit
  status 2, and Ctrl-C with one line saying what was kept (status 130); other exceptions keep their traceback.

dvc.yaml is the one description of each stage: its params, code deps and outs are read from there (`StageSpec`),
never listed again in the code."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.distributed.elastic.multiprocessing.errors import record

from . import dist, faults, launch
from .config import Params, load_params
from .errors import BadInput, InputFileNotFound
from .io import disk_error, fingerprint, is_disk_error, read_json

log = logging.getLogger("transfgu")
DVC_YAML = Path("dvc.yaml")
ERROR_FILE_ENV = "TRANSFGU_ERROR_FILE"  # where a rank writes its one-line error (repeated after torchrun's report)


# -- dvc.yaml: each stage's params, deps and outs, written once ---------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    """A stage as dvc.yaml declares it: the dotted params it reads, its deps (code and data) and its outs
    (outs, metrics and plots)."""
    name: str
    params: tuple
    deps: tuple
    outs: tuple = field(default=())

    def reads(self, name: str) -> bool:
        """Whether a dep of this stage has the file name `name`."""
        return any(Path(p).name == name for p in self.deps)

    def path(self, name: str) -> Path:
        """The dep or out of this stage whose file name is `name` (e.g. 'feature_bank.h5')."""
        for p in (*self.outs, *self.deps):
            if Path(p).name == name:
                return Path(p)
        raise KeyError(f"dvc.yaml: stage {self.name} declares no dep or out named {name}")

    @property
    def code(self) -> list:
        """The stage's code deps (its import closure, kept exact by tests/test_dvc_deps.py) as (name, path)."""
        return [(d, Path(d)) for d in self.deps if d.endswith(".py")]


def _names(entries) -> tuple:
    return tuple(next(iter(e)) if isinstance(e, dict) else e for e in entries or ())


def stage_spec(name: str, dvc_yaml: str | Path = DVC_YAML) -> StageSpec:
    if not Path(dvc_yaml).is_file():
        raise InputFileNotFound(f"{dvc_yaml} not found: run the stages from the project root")
    stage = yaml.safe_load(Path(dvc_yaml).read_text())["stages"][name]
    return StageSpec(name, _names(stage.get("params")), _names(stage.get("deps")),
                     _names(stage.get("outs")) + _names(stage.get("metrics")) + _names(stage.get("plots")))


# -- the one error channel -----------------------------------------------------------------------------------------
def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    if os.environ.get(ERROR_FILE_ENV):
        with contextlib.suppress(OSError):
            Path(os.environ[ERROR_FILE_ENV]).write_text(message + "\n")


@contextlib.contextmanager
def one_line_errors(interrupted: str = "nothing that looks finished was written"):
    """Expected errors (BadInput, a write that failed for the disk's sake) end the process with 'error: <one
    line>' and exit status 2, Ctrl-C with one line saying `interrupted` and status 130; any other exception keeps
    its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for all the ranks
            _report(f"interrupted: {interrupted}")
        sys.exit(130)
    except (BadInput, OSError) as e:
        if not isinstance(e, BadInput):
            if not is_disk_error(e):
                raise
            e = disk_error(e.filename or "an output", e)  # a write outside atomic_output (e.g. a piece)
        _report(f"error: {e}")
        sys.exit(2)


# -- launching under torchrun --------------------------------------------------------------------------------------
def torchrun_command(script: str, params: Params, argv=()) -> list | None:
    """The command that runs `script` in launcher.nproc_per_node x nodes processes (torchrun here, or srun +
    torchrun on every node of a Slurm allocation: transfgu/launch.py), or None for one."""
    return launch.command(params.launcher, script, argv)


def _run_torchrun(cmd: list) -> int:
    """Run torchrun; a rank's one-line error is repeated after torchrun's own report, Ctrl-C waits for the ranks
    to stop."""
    # under srun, ranks on other nodes write the error file: a folder of the project (a shared filesystem)
    with tempfile.TemporaryDirectory(prefix=".transfgu-", dir=os.getcwd() if cmd[0] == "srun" else None) as tmp:
        error_file = Path(tmp) / "error"
        proc = subprocess.Popen(cmd, env=dict(os.environ, **{ERROR_FILE_ENV: str(error_file)}))
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the ranks got the signal too, and report it themselves
            return proc.wait()
        if code and error_file.is_file():
            print(error_file.read_text().strip(), file=sys.stderr)
    return code


# -- the stage's context -------------------------------------------------------------------------------------------
class Stage:
    """One stage's run: its params (`params`, typed), its dvc.yaml entry (`spec`), this process's device, and the
    resolvers of the settings every network stage has (backbone, precision, DataLoader workers)."""

    def __init__(self, name: str, params: Params, spec: StageSpec):
        self.name, self.params, self.spec = name, params, spec
        self.device = dist.local_device()

    def dep(self, name: str) -> Path:
        return self.spec.path(name)

    out = dep

    @functools.cached_property
    def index(self) -> dict:
        """The split index written by prepare."""
        return read_json(self.dep("index.json"))

    @property
    def config(self):
        """This stage's own section of params.yaml (params.extract for extract...)."""
        return getattr(self.params, self.name)

    def backbone(self) -> torch.nn.Module:
        from .models.vit import build_backbone
        b = self.params.backbone
        model = build_backbone(b.arch, b.patch, b.checkpoint, seed=self.params.seed)
        if not b.checkpoint:
            if dist.is_main():
                log.warning("backbone %s/%d has RANDOM weights (backbone.checkpoint is empty): results are not "
                            "meaningful segmentations", b.arch, b.patch)
        else:
            log.info("backbone %s/%d loaded from %s", b.arch, b.patch, b.checkpoint)
        return model.to(self.device)

    def precision(self) -> str:
        """'fp32' or 'bf16': this stage's `precision` on this device (auto: bf16 on a GPU)."""
        from .precision import resolve_precision
        return resolve_precision(self.config.precision, self.device)

    def workers(self) -> int:
        """DataLoader worker processes: this stage's `num_workers`, where auto = none on the CPU (decoding would
        take the cores from the model) and min(8, CPUs per process) with a GPU."""
        value = self.config.num_workers
        if value != "auto":
            return value
        if self.device.type != "cuda":
            return 0
        return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))

    def run_key(self, inputs=(), **resolved) -> str:
        """The fingerprint of what the stage's results depend on (transfgu.io.fingerprint): the params it reads
        (dvc.yaml), values resolved at run time (`resolved`, e.g. the precision and the device type), the input
        files (`inputs`, and the backbone checkpoint) and its code (dvc.yaml's code deps). It names the pieces
        (extract, pseudo, evaluate) or the checkpoint (train) an interrupted run resumes from: work done with
        other params, inputs or code is never reused. Rank 0's value on every rank."""
        config = {"stage": self.name, **resolved, **{k: self.params.value(k) for k in self.spec.params}}
        key = fingerprint(config, [*inputs, self.params.backbone.checkpoint], self.spec.code) \
            if dist.is_main() else None
        return dist.broadcast_object(key)

    def pieces(self, final: Path, dataset, batch_size: int, key: str, packed=()):
        """The batches still to compute and the pieces their results go to (transfgu.pieces.BatchPieces), with
        this stage's DataLoader workers and its fault points (transfgu.faults, for the resume tests)."""
        from .pieces import BatchPieces
        return BatchPieces(final, dataset, batch_size, self.workers(), key, self.name, packed=packed,
                           on_point=faults.hook(self.name))

    @contextlib.contextmanager
    def timed(self, what: str | None = None):
        t0 = time.time()
        yield
        log.info("%s took %.1f s", what or self.name, time.time() - t0)


def _setup(name: str) -> Stage:
    """Join the torchrun process group if there is one, configure logging, read and check params.yaml (and, after
    prepare, that the split index suits it), seed everything. Ranks other than 0 log warnings only."""
    dist.init_from_env()
    tag = f"{name} rank {dist.rank()}/{dist.world_size()}" if dist.world_size() > 1 else name
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format=f"%(asctime)s [{tag}] %(message)s", datefmt="%H:%M:%S")
    params = load_params()
    stage = Stage(name, params, stage_spec(name))
    if stage.spec.reads("index.json") and stage.dep("index.json").is_file():  # not prepare: it writes the index
        params.check_index(stage.index, dist.world_size())
    random.seed(params.seed)
    np.random.seed(params.seed)
    torch.manual_seed(params.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return stage


def run_stage(name: str, main, distributed: bool = False, keeps: str | None = None) -> None:
    """Run a stage's `main(stage)` as described in the module docstring; `distributed`: the stage shards its work
    over torchrun processes when params.yaml asks for several; `keeps`: what an interrupted run keeps and a re-run
    continues from (e.g. 'finished batches'), said on Ctrl-C."""
    kept = (f"its {keeps} are kept and a re-run (dvc repro) continues from them" if keeps else
            "nothing that looks finished was written; a re-run (dvc repro) starts it again")

    @record  # under torchrun: a rank's unexpected error goes to torchrun's report with its traceback
    def run():
        with one_line_errors(f"{name} stopped; {kept}"):
            if distributed and "LOCAL_RANK" not in os.environ:
                cmd = torchrun_command(sys.argv[0], load_params(), sys.argv[1:])
                if cmd:
                    sys.exit(_run_torchrun(cmd))
            stage = _setup(name)
            try:
                main(stage)
                dist.barrier()
            finally:
                dist.shutdown()
    run()
