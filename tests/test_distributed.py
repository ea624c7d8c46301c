"""Two-process CPU torchrun of the tiny preset (DistributedDataParallel over gloo)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import torch

from tests.model_shards import write_sphere_shards
from wt_model.checkpoint import load_model


def test_torchrun_two_processes_train_tiny(tmp_path):
    write_sphere_shards(tmp_path / "shards", views=6, shards=3, size=64)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "wt_model.train", "--shards", str(tmp_path / "shards" / "*.tar"), "--preset", "tiny",
           "--steps", "3", "--out", str(out), "--batch", "2", "--workers", "1", "--log-every", "1",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # one log, written by rank 0 only
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["train"]["world_size"] == 2
    model, _, _ = load_model(out / "last.pt")
    assert model.cfg.preset == "tiny"
    assert not list(out.glob("*.tmp"))
