"""Data-parallel local learning on CPU with the gloo backend."""

import json
import os
import socket
import subprocess
import sys
import time

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


# ---- the long-term bank under DDP -------------------------------------------------------------
BANK_OPTS = dict(OPTS, num_samples=32)


def _bank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.utils.data.distributed import DistributedSampler

    from fba.distributed import distribute, setup_from_env, teardown

    info = setup_from_env()
    learner = fba.build_learner(**BANK_OPTS)
    distribute(learner, info, torch.device("cpu"))
    bank, last = learner.bank, learner.K - 1
    written = []  # what this rank's last module wrote: (indices, summaries) per step
    commit = bank.end_step

    def recording_end_step():
        written.append((bank._indices.clone(), bank._step[last].clone()))
        commit()

    bank.end_step = recording_end_step
    x, y = tiny_batch(n=32, size=16)
    sampler = DistributedSampler(range(32), num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    order = torch.tensor(list(sampler))
    for idx in order.split(8):  # one epoch: 2 steps of 8 samples on each of the 2 ranks
        learner.train_step(x[idx], y[idx], idx)
    torch.save({"table": bank.table, "filled": bank.filled, "written": written}, f"{out}.{rank}")
    teardown(info, learner)


def test_longterm_bank_is_the_same_full_table_on_every_rank(tmp_path):
    out = str(tmp_path / "bank")
    mp.spawn(_bank_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for state in ranks:
        assert bool(state["filled"].all()), "after one epoch every sample has a row, on every rank"
    assert torch.equal(ranks[0]["table"], ranks[1]["table"])
    # A single process fed the same global batches (rank 0's then rank 1's entries) holds the same table.
    reference = torch.zeros_like(ranks[0]["table"])
    for (idx0, h0), (idx1, h1) in zip(ranks[0]["written"], ranks[1]["written"], strict=True):
        reference[torch.cat([idx0, idx1])] = torch.cat([h0, h1]).to(reference.dtype)
    assert torch.equal(ranks[0]["table"], reference)


# ---- a non-finite loss on one rank -------------------------------------------------------------
@pytest.mark.parametrize("method", ["fba", "dgl"])  # a global step, and a step per module
def test_nan_loss_on_one_rank_stops_every_rank_with_one_line(tmp_path, method):
    # Two processes as torchrun would start them, each watched on its own (torchrun itself
    # would kill the second as soon as the first exits, hiding how that one would have ended).
    script = os.path.join(os.path.dirname(__file__), "helpers", "nan_on_rank1.py")
    port = str(_free_port())
    args = [sys.executable, script, "train", "model=resnet8", "K=4", f"method={method}", "train.epochs=1",
            "train.progress=false", "data.batch_size=64", f"train.runs_dir={tmp_path}"]
    start = time.monotonic()
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
             for rank in range(2)]
    try:
        results = [proc.communicate(timeout=180) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert time.monotonic() - start < 120
    for proc, (_, stderr) in zip(procs, results):
        errors = [line for line in stderr.splitlines() if line.startswith("fba: error:")]
        assert proc.returncode == 2 and len(errors) == 1, stderr[-2000:]
        assert "the loss of module 0 on rank 1 is nan at step 1" in errors[0]
        assert "Traceback" not in stderr


# ---- random streams -----------------------------------------------------------------------------
def test_ranks_draw_different_augmentations_in_the_same_epoch(tmp_path):
    from fba.distributed import DistInfo
    from fba.training.trainer import Trainer

    trainer = Trainer(fba.config.resolve_config(None, ["model=resnet8", "K=4", f"train.runs_dir={tmp_path}"]))
    views, seeds = [], []
    for rank in (0, 1):
        trainer.dist = DistInfo(rank=rank, world_size=2)
        trainer.seed_epoch(3)
        views.append(trainer.train_set[0][0])  # the same sample, augmented on each rank
        seeds.append(trainer.loader(True, 3).generator.initial_seed())  # DataLoader workers' seeds
    assert not torch.equal(views[0], views[1])
    assert seeds[0] != seeds[1]
    trainer.dist = DistInfo(rank=1, world_size=2)
    trainer.seed_epoch(3)
    assert torch.equal(trainer.train_set[0][0], views[1]), "a rank's stream stays reproducible"


# ---- what DDP can average ------------------------------------------------------------------------
class _OneProcess:
    rank, world_size = 0, 1

    def gather_rows(self, t):
        return t


def test_distribute_refuses_a_parameter_owned_by_two_units():
    learner = fba.build_learner(**OPTS)
    # Not a head, not under a known attribute name: module 2 inside aux net 0.
    learner.aux_nets[0].borrowed = learner.local_modules[2]
    with pytest.raises(ValueError, match="shared by local units 0 and 2"):
        learner.distribute(lambda unit: unit, _OneProcess())


def test_distribute_accepts_the_default_units():
    learner = fba.build_learner(**OPTS)
    learner.distribute(lambda unit: unit, _OneProcess())
    learner.train_step(*tiny_batch(), torch.arange(8))


def test_a_model_parameter_in_no_optimizer_is_an_error():
    from torch import nn

    from fba.engine.learner import LocalLearner

    donor = fba.build_learner(**OPTS)
    plain = donor.plain
    plain.orphan = nn.Linear(2, 2)  # in the plain model, in no unit and not in the head
    with pytest.raises(ValueError, match="never be trained: orphan.weight, orphan.bias"):
        LocalLearner(plain, list(donor.local_modules), donor.head, list(donor.aux_nets), donor.method, donor.task,
                     make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1), step_mode="per_module")
