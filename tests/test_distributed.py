"""Scale-out: the multi-node launch users take on a cluster, run as two nodes on one machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from test_train import step_losses, write_config, write_data
from tunesmith import artifacts, train
from tunesmith.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_by_c10d_rendezvous_match_one_process(tiny_model_dir, tmp_path):
    """torchrun --nnodes 2 as two launchers on 127.0.0.1 (c10d rendezvous, one process each,
    gloo, 1 thread), batch 2 per process, against 1 process with batch 4: the same per-step
    losses (1e-5 relative, fp32; they differ only in the order of the gradient sum)."""
    write_data(tmp_path)
    keys = dict(max_steps=6, eval_every=3, grad_accum=2, learning_rate=1e-2)
    one = train.run(load_config(write_config(tmp_path, tiny_model_dir, "one", batch_size=4, **keys)))
    two_cfg = write_config(tmp_path, tiny_model_dir, "two", batch_size=2, parallel="ddp", **keys)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes",
        "--local-addr", "127.0.0.1", "-m", "tunesmith", "train", str(two_cfg),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / artifacts.MANIFEST_FILE).read_text())["train"]
    assert manifest["world_size"] == 2 and manifest["parallel"] == "ddp"
    assert len(step_losses(tmp_path / "two")) == 6
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-5)
    assert manifest["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)
