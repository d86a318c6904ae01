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


def test_more_processes_than_gpus_is_refused_before_any_starts(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """On a 1-GPU CUDA machine `--nproc 2` would start rank 1 on cuda:1 and crash: refused in
    one line (exit 2) before torchrun is launched, and by each process under a hand-started
    torchrun; on the CPU (no CUDA) any count runs with gloo. CUDA is faked: this machine has none."""
    import torch

    from tunesmith.cli import main
    from tunesmith.distributed import check_processes_fit_devices, init_distributed
    from tunesmith.errors import UserError

    write_data(tmp_path)
    cfg = write_config(tmp_path, tiny_model_dir, "run")
    launched, devices_set = [], []
    monkeypatch.setattr(subprocess, "call", lambda command, *a, **k: launched.append(command) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: devices_set.append(device))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(cfg), "--nproc", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and launched == []
    assert "2 training processes on this machine but it has 1 CUDA GPU" in err and "--nproc 1 or fewer" in err
    assert "CUDA_VISIBLE_DEVICES=" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # torchrun started by hand: rank 1 refuses before taking a device or joining the group.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="2 training processes on this machine but it has 1 CUDA GPU"):
        init_distributed()
    assert devices_set == []
    # As many processes as GPUs: allowed, and torchrun is launched.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_processes_fit_devices(2)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(cfg), "--nproc", "2"])
    assert exit_info.value.code == 0 and len(launched) == 1 and "--nproc-per-node=2" in launched[0]
    # No CUDA: processes run on the CPU with gloo, any count.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_processes_fit_devices(8)
