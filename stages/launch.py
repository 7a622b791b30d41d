"""Run a stage as one process, or through torchrun when params.yaml asks for more than one.

    python stages/launch.py extract        # what dvc.yaml runs

launcher.nproc_per_node x launcher.nnodes processes; one node: `torchrun --standalone`; several nodes:
c10d rendezvous at launcher.rdzv_endpoint (run the same command on every node, see README)."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

STAGES = ("prepare", "extract", "cluster", "pseudo", "train", "evaluate")
DISTRIBUTED = ("extract", "pseudo", "train", "evaluate")  # the others run as one process


def command(stage: str, params: dict, extra=()) -> list:
    script = str(Path(__file__).resolve().parent / f"{stage}.py")
    launcher = params.get("launcher") or {}
    nproc, nnodes = int(launcher.get("nproc_per_node", 1)), int(launcher.get("nnodes", 1))
    if nproc < 1 or nnodes < 1:
        raise SystemExit(f"launcher.nproc_per_node / nnodes must be >= 1, got {nproc} / {nnodes}")
    if stage not in DISTRIBUTED or nproc * nnodes == 1:
        return [sys.executable, script, *extra]
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--max_restarts=0"]
    if nnodes == 1:
        run.append("--standalone")
    else:
        run += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={launcher['rdzv_endpoint']}",
                f"--rdzv_id={launcher.get('rdzv_id', 'transfgu')}"]
    return run + [script, *extra]


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        raise SystemExit(f"usage: python stages/launch.py {{{','.join(STAGES)}}} [stage arguments]")
    params_path = Path(os.environ.get("TRANSFGU_PARAMS", "params.yaml"))
    params = yaml.safe_load(params_path.read_text()) if params_path.is_file() else {}
    cmd = command(sys.argv[1], params, sys.argv[2:])
    if cmd[1:3] != ["-m", "torch.distributed.run"]:
        sys.exit(subprocess.run(cmd).returncode)
    # under torchrun, a rank's one-line error is followed by torchrun's own report: repeat the line last
    with tempfile.TemporaryDirectory() as tmp:
        error_file = Path(tmp) / "error"
        code = subprocess.run(cmd, env=dict(os.environ, TRANSFGU_ERROR_FILE=str(error_file))).returncode
        if code and error_file.is_file():
            print(error_file.read_text().strip(), file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
