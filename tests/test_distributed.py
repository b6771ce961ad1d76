"""Data-parallel local learning on CPU with the gloo backend."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import fba
from conftest import tiny_batch

OPTS = dict(model="resnet8", K=4, num_classes=10, optim={"momentum": 0.0, "weight_decay": 0.0, "nesterov": False, "lr": 0.1})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, step: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fba.distributed import distribute, setup_from_env, teardown

    info = setup_from_env()
    learner = fba.build_learner(**OPTS, **{"optim.step": step})
    distribute(learner, info, torch.device("cpu"))
    x, y = tiny_batch(n=16, size=16)
    shard = slice(rank * 8, rank * 8 + 8)
    learner.train_step(x[shard], y[shard], torch.arange(16)[shard])
    if rank == 0:
        torch.save({k: v for k, v in learner.plain.named_parameters()}, out)
    teardown(info, learner)


@pytest.mark.parametrize("step", ["global", "per_module"])
def test_ddp_step_equals_the_mean_of_the_replicas_updates(tmp_path, step):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), step, out), nprocs=2, join=True)
    ddp = torch.load(out)
    # With plain SGD the averaged-gradient step is the mean of the two single-shard steps.
    x, y = tiny_batch(n=16, size=16)
    replicas = []
    for shard in (slice(0, 8), slice(8, 16)):
        learner = fba.build_learner(**OPTS, **{"optim.step": step})
        learner.train_step(x[shard], y[shard], torch.arange(16)[shard])
        replicas.append(dict(learner.plain.named_parameters()))
    start = dict(fba.build_learner(**OPTS).plain.named_parameters())
    for name, value in ddp.items():
        expected = (replicas[0][name] + replicas[1][name]) / 2
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6, msg=name)
        if not torch.equal(replicas[0][name], replicas[1][name]):
            assert not torch.equal(value, start[name])


def test_torchrun_train_cli(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "fba.cli", "train", "model=resnet8", "K=4", "train.epochs=1", "train.progress=false",
           "data.batch_size=64", f"train.runs_dir={tmp_path}", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and 0 <= summary["top1"] <= 1
    assert len(list(tmp_path.iterdir())) == 1  # one run folder, written by rank 0 only
