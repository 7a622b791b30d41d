"""benchmarks/pretrain_gpu.sh: the GPU session's one command. Its --quick path runs end to end on a 2-core CPU in
about 2.5 minutes (too long for the suite: docs/usage.md, "Pretraining a backbone", has that dry run); here: the script
parses, refuses bad arguments before doing anything, and keeps the options of `transfgu pretrain` it uses."""
import os
import re
import subprocess
from pathlib import Path

from transfgu.pretrain import add_arguments

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "pretrain_gpu.sh"


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and "pip install" not in text and not re.search(r"^\s*dvc ", text, re.M)


def test_script_refuses_bad_arguments(tmp_path):
    for args in ([], [str(tmp_path / "o"), "--fast"], [str(tmp_path / "o"), "--quick", "x"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage:" in proc.stderr, args
    assert not (tmp_path / "o").exists()
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "o"), "--quick"], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PRETRAIN_LAYOUT": "mosaic"})
    assert proc.returncode == 2 and "PRETRAIN_LAYOUT=mosaic: expected scenes or objects" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_script_uses_existing_pretrain_options():
    import argparse
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    known = {opt for action in ap._actions for opt in action.option_strings}
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", SCRIPT.read_text())) - {"--quick"}
    assert used <= known, sorted(used - known)
