"""The multi-GPU overlay under ``torchrun`` with 2 CPU processes (gloo): it trains, logs the loss once, and only
rank 0 writes.

Every write under the run folder (``open`` for writing, ``os.open`` with a write flag, ``mkdir``, ``mkstemp``,
``rename``/``replace``) is recorded per rank by a Python audit hook installed through ``sitecustomize``; the
command itself is the documented one, ``torchrun --nproc_per_node=2 -m monai.bundle run --config_file [...]``.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from medad import bundle

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "ddpm_partial" / "configs"

AUDIT_HOOK = '''
import atexit, os, sys
_root, _out = os.environ.get("MEDAD_AUDIT_ROOT"), os.environ.get("MEDAD_AUDIT_DIR")
if _root and _out:
    _events = []
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _under(path):
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(_root)
        except TypeError:
            return False

    def _hook(event, args):
        if event == "open" and _under(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & _write_flags):
                _events.append(("write", os.fsdecode(args[0])))
        elif event in ("os.rename", "os.replace") and _under(args[1]):
            _events.append(("rename", os.fsdecode(args[1])))
        elif event in ("os.mkdir", "tempfile.mkstemp", "tempfile.mkdtemp") and _under(args[0]):
            _events.append((event, os.fsdecode(args[0])))

    @atexit.register
    def _dump():
        with open(os.path.join(_out, "rank%s.txt" % os.environ.get("RANK", "none")), "w") as f:
            f.writelines("%s %s\\n" % e for e in _events)

    sys.addaudithook(_hook)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_gloo_processes(tmp_path: Path):
    run_dir, audit = tmp_path / "run", tmp_path / "audit"
    audit.mkdir()
    (audit / "hook").mkdir()
    (audit / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(audit / "hook"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
        "MEDAD_AUDIT_ROOT": str(run_dir),
        "MEDAD_AUDIT_DIR": str(audit),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        "torchrun", "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "monai.bundle", "run",
        "--config_file", str(bundle.config_files(CONFIGS.parent, "multi_gpu_train")),
        "--run_dir", str(run_dir), "--image_size", "16", "--max_steps", "3", "--batch_size", "2",
        "--restoration_steps", "2", "--network_def#channels", "$(8, 16, 16)",
        "--network_def#attention_levels", "$(False, False, False)", "--network_def#num_head_channels", "8",
        "--demo_kwargs", "{'num_train': 10, 'num_test_good': 3, 'num_test_defect': 4, 'image_size': 16}",
        "--evaluator#num_overlays", "1",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, errors="replace", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the loss is logged once per epoch, by one process: 9 training images / (2 ranks x 2) = 2 steps an epoch
    with open(run_dir / "eval" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 3] and [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)

    # rank 1 wrote nothing in the run folder; rank 0 wrote the data, checkpoints, maps and tables
    rank0 = (audit / "rank0.txt").read_text(encoding="utf-8").splitlines()
    rank1 = (audit / "rank1.txt").read_text(encoding="utf-8").splitlines()
    assert rank1 == []
    written = {line.split(" ", 1)[1] for line in rank0}
    for name in ("models/model.pt", "models/checkpoint.pt", "models/calibration.json", "eval/metrics.json",
                 "eval/cases.csv", "eval/train_log.csv"):
        assert str(run_dir / name) in written, name
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # every atomic write completed
