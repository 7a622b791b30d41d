"""launcher.backend: which launcher a distributed stage uses (auto, local, slurm) and the command it runs, given a
fake Slurm environment: the first node of the host list, the node count, processes per node from the GPUs Slurm
gave, the node rank each srun task takes. The real one-host Slurm run: tests/test_distributed.py."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_project import copy_project, default_params, run_stage_here
from transfgu.config import LauncherConfig, validate_params
from transfgu.errors import BadInput
from transfgu.launch import AGENT, first_node, plan, rendezvous

JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[007-009]",
       "SLURM_NTASKS": "3", "SLURM_PROCID": "0"}


def launcher(**kw) -> LauncherConfig:
    return LauncherConfig(**kw)


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[007-009]", "gpu007"), ("node3", "node3"), ("a1,b[2-3]", "a1"), ("gpu[12,3-4],cpu1", "gpu12"),
    ("rack[1-2]-n[01-04]", "rack1-n01"), ("n[0010-0012]", "n0010"), (" x[5] ", "x5")])
def test_first_node_of_a_slurm_host_list(nodelist, first):
    """What `scontrol show hostnames` lists first (checked against scontrol itself in the Slurm test)."""
    assert first_node(nodelist) == first


def test_auto_is_slurm_only_inside_an_allocation_of_several_nodes():
    assert plan(launcher(), {}).backend == "local"
    assert plan(launcher(), {**JOB, "SLURM_JOB_NUM_NODES": "1"}).backend == "local"
    assert plan(launcher(), JOB) == plan(launcher(backend="slurm"), JOB)
    assert plan(launcher(), JOB).backend == "slurm" and plan(launcher(), JOB).nodes == 3
    older = {k: v for k, v in JOB.items() if k != "SLURM_JOB_NUM_NODES"} | {"SLURM_NNODES": "2"}
    assert plan(launcher(), older).nodes == 2
    assert plan(launcher(backend="local", nnodes=2), JOB) == plan(launcher(nnodes=2), {})
    assert plan(launcher(backend="local", nnodes=2), JOB).nodes == 2
    one_node = {**JOB, "SLURM_JOB_NUM_NODES": "1"}
    assert plan(launcher(backend="slurm", nproc_per_node=2), one_node).backend == "slurm"  # srun on one node too


def test_slurm_outside_an_allocation_is_one_line():
    with pytest.raises(BadInput, match="launcher.backend is slurm but this is not a Slurm allocation"):
        plan(launcher(backend="slurm"), {})


@pytest.mark.parametrize("env, nproc", [({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, 4),
                                        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3), ({}, 1),
                                        ({"SLURM_GPUS_ON_NODE": "0"}, 1)])
def test_processes_per_node_auto_are_the_gpus_slurm_gave(env, nproc):
    assert plan(launcher(nproc_per_node="auto"), {**JOB, **env}).nproc_per_node == nproc
    assert plan(launcher(nproc_per_node=2), {**JOB, **env}).nproc_per_node == 2


def test_slurm_command_one_torchrun_agent_per_node():
    env = {**JOB, "SLURM_GPUS_ON_NODE": "4", "TRANSFGU_RDZV_HOST": "gpu007-ib"}
    cmd = _command(env, nproc_per_node="auto")
    bash = cmd.index("bash")
    assert cmd[:bash] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "--nodes=3", "--ntasks=3",
                          "--ntasks-per-node=1"]
    assert cmd[bash + 1:bash + 4] == ["-c", AGENT, sys.executable]
    rest = cmd[bash + 4:]
    assert rest[:5] == ["--nnodes=3", "--nproc_per_node=4", "--max_restarts=0", "--rdzv_backend=static",
                        rest[4]] and rest[4].startswith("--rdzv_endpoint=gpu007-ib:")
    assert rest[5:] == ["--rdzv_id=4242", "stages/extract.py", "a b"]


def _command(env, **kw):
    from transfgu.launch import command
    return command(launcher(**kw), "stages/extract.py", ["a b"], env)


def test_each_srun_task_is_a_torchrun_agent_whose_node_rank_is_its_slurm_rank(tmp_path):
    """The task's shell expands SLURM_PROCID into --node_rank before torchrun's script; arguments pass verbatim.
    (torchrun's python replaced by a script that prints what it was given.)"""
    cmd = _command(JOB, nproc_per_node=2)
    echo = tmp_path / "echo"
    echo.write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n")
    echo.chmod(0o755)
    bash = cmd.index("bash")
    agent = [*cmd[bash:bash + 3], str(echo), *cmd[bash + 4:]]
    out = subprocess.run(agent, env={"SLURM_PROCID": "2", "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[:3] == ["-m", "torch.distributed.run", "--node_rank=2"]
    assert out[3:] == cmd[bash + 4:]


def test_rendezvous_on_the_first_node_a_port_per_job_and_folder():
    first = rendezvous(JOB, cwd="/p/exp1")
    assert first.startswith("gpu007:") and first == rendezvous(JOB, cwd="/p/exp1")
    ports = {rendezvous({**JOB, "SLURM_JOB_ID": j}, cwd=c).split(":")[1] for j in ("1", "2") for c in ("/a", "/b")}
    assert len(ports) == 4 and all(20000 <= int(p) < 40000 for p in ports)
    # on the first node itself (an sbatch script's dvc repro) or at a loopback host: a port free here
    for env in ({**JOB, "SLURMD_NODENAME": "gpu007"}, {**JOB, "TRANSFGU_RDZV_HOST": "127.0.0.1"}):
        host, port = rendezvous(env).rsplit(":", 1)
        assert host == env.get("TRANSFGU_RDZV_HOST", "gpu007") and 0 < int(port) < 65536


def test_tasks_standing_for_nodes_on_one_host():
    env = {**JOB, "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2", "TRANSFGU_SLURM_TASKS_AS_NODES": "1",
           "TRANSFGU_RDZV_HOST": "127.0.0.1"}
    cmd = _command(env, backend="slurm")
    assert cmd[:cmd.index("bash")] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "--nodes=1",
                                       "--ntasks=2"]
    assert "--nnodes=2" in cmd and "--nproc_per_node=1" in cmd
    assert next(a for a in cmd if a.startswith("--rdzv_endpoint=")).startswith("--rdzv_endpoint=127.0.0.1:")


def test_outside_slurm_nothing_changes():
    assert _command({}) is None
    assert _command({}, nproc_per_node=2)[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2",
                                                  "--max_restarts=0", "--standalone", "stages/extract.py", "a b"]
    assert _command({}, nproc_per_node=2, nnodes=2)[4:] == [
        "--max_restarts=0", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:29400",
        "--rdzv_id=transfgu", "stages/extract.py", "a b"]
    assert _command({**JOB, "SLURM_JOB_NUM_NODES": "1"}) is None  # a one-node allocation: a plain process


def test_a_stage_with_backend_slurm_outside_slurm_stops_with_one_line(tmp_path, monkeypatch, capsys):
    for var in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(var, raising=False)
    copy_project(tmp_path, default_params({"dataset": {"R": 32, "synthetic": {"n_train": 4, "n_val": 2,
                                                                               "size": 32}},
                                           "train": {"batch_size": 2}, "launcher": {"backend": "slurm"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_stage_here("prepare")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: params.yaml: launcher.backend is slurm but this is not a Slurm allocation (SLURM_JOB_ID is "
        "unset): run `dvc repro` inside sbatch / salloc, or set launcher.backend: auto")
    assert not (tmp_path / "outputs" / "index.json").exists()


def test_params_accept_the_backends_and_nproc_auto():
    params = validate_params(default_params({"launcher": {"backend": "slurm", "nproc_per_node": "auto"}}),
                             check_data=False)
    assert params.launcher.backend == "slurm" and params.launcher.nproc_per_node == "auto"
    with pytest.raises(BadInput, match="launcher.backend"):
        validate_params(default_params({"launcher": {"backend": "mpi"}}), check_data=False)
    with pytest.raises(BadInput, match="launcher.nproc_per_node"):
        validate_params(default_params({"launcher": {"nproc_per_node": "all"}}), check_data=False)
