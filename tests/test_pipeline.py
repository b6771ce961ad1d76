"""distributed.mode=pipeline: modules on different processes, equal to one process's per-module step."""

import contextlib
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
from fba.pipeline import balance

OPTS = dict(model="resnet8", K=4, num_classes=10, num_samples=16, **{"optim.step": "per_module"})
# 16 samples, batches of 8: epoch 2 starts with the samples that ended epoch 1, so rank 0 must
# wait for their long-term entries from the last rank before its very next batch.
ORDER = [list(range(0, 8)), list(range(8, 16)), list(range(8, 16)), list(range(0, 8)), [1, 3, 5, 7, 9, 11, 13, 15],
         [0, 2, 4, 6, 8, 10, 12, 14]]


@contextlib.contextmanager
def one_thread():
    """Equal parameters need equal float reductions: the stages run one thread each, so the
    single-process reference does too (another thread count reorders a convolution's sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    x, y = tiny_batch(n=16, size=16)
    for idx in ORDER:
        idx = torch.tensor(idx)
        yield x[idx], y[idx], idx


def _recording_reads(learner, reads):
    read = learner.bank.read

    def recording(k, device):
        out = read(k, device)
        if k == 0:
            reads.append((out[0].clone(), out[1].clone()))
        return out

    learner.bank.read = recording


def _stage_worker(rank, world, port, method, groups, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from fba.pipeline import PipelineStage

    dist.init_process_group("gloo")
    learner = fba.build_learner(**OPTS, method=method)
    reads = []
    if learner.bank is not None:
        _recording_reads(learner, reads)
    stage = PipelineStage(learner, [range(a, b) for a, b in groups], rank, torch.device("cpu"))
    for batch in _batches():
        stage.train_step(batch if rank == 0 else None)
    stage.gather_to_main()
    if rank == 0:
        torch.save({"params": dict(learner.named_parameters()), "buffers": dict(learner.named_buffers()),
                    "table": learner.bank.table if learner.bank is not None else None, "reads": reads}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("method, groups", [("fba", [(0, 2), (2, 4)]), ("fba", [(0, 1), (1, 4)]), ("dgl", [(0, 3), (3, 4)])])
def test_pipeline_equals_the_single_process_per_module_step(tmp_path, method, groups):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_stage_worker, args=(2, _free_port(), method, groups, out), nprocs=2, join=True)
    piped = torch.load(out)
    single = fba.build_learner(**OPTS, method=method)
    reads = []
    if single.bank is not None:
        _recording_reads(single, reads)
    with one_thread():
        for batch in _batches():
            single.train_step(*batch)
    for name, value in single.named_parameters():
        assert torch.equal(piped["params"][name], value), name
    for name, value in single.named_buffers():
        assert torch.equal(piped["buffers"][name], value), name
    if method == "fba":
        assert torch.equal(piped["table"], single.bank.table)
        # Every long-term read on rank 0 saw the table a single process sees, revisits included.
        assert len(piped["reads"]) == len(reads) == len(ORDER)
        for (features, valid), (expected, expected_valid) in zip(piped["reads"], reads):
            assert torch.equal(valid, expected_valid) and torch.equal(features, expected)
        assert bool(reads[2][1].all()), "the revisit at step 2 reads entries written at step 1"


def test_balance_minimises_the_largest_group():
    assert balance([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert balance([5, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert balance([1, 2, 3, 4, 5], 3) == [range(0, 3), range(3, 4), range(4, 5)]
    with pytest.raises(fba.FBAError, match="only K=2 modules"):
        balance([1, 1], 3)


def test_lookahead_bank_cannot_be_pipelined():
    from fba.pipeline import PipelineStage

    learner = fba.build_learner(**OPTS, **{"fba.bank.source": "lookahead"})
    with pytest.raises(fba.FBAError, match="lookahead"):
        PipelineStage(learner, [range(0, 2), range(2, 4)], 0, torch.device("cpu"))


def test_global_step_cannot_be_pipelined():
    from fba.pipeline import PipelineStage

    learner = fba.build_learner(**{**OPTS, "optim.step": "global"})
    with pytest.raises(fba.FBAError, match="per_module"):
        PipelineStage(learner, [range(0, 2), range(2, 4)], 0, torch.device("cpu"))


def test_torchrun_pipeline_run_equals_an_ordinary_per_module_run(tmp_path):
    common = ["model=resnet8", "K=4", "train.epochs=2", "train.progress=false", "data.batch_size=128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fba.cli", "train",
           *common, "distributed.mode=pipeline", f"train.runs_dir={tmp_path / 'pipe'}", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    piped = json.loads(proc.stdout.strip().splitlines()[-1])
    assert piped["world_size"] == 2 and piped["distributed_mode"] == "pipeline"
    assert len(list((tmp_path / "pipe").iterdir())) == 1  # rank 0 alone writes the run folder
    from fba.cli import main

    from io import StringIO

    stdout = StringIO()
    with contextlib.redirect_stdout(stdout), one_thread():
        assert main(["train", *common, "optim.step=per_module", f"train.runs_dir={tmp_path / 'one'}", "--json"]) == 0
    single = json.loads(stdout.getvalue().strip().splitlines()[-1])
    assert piped["top1"] == single["top1"] and piped["test_loss"] == pytest.approx(single["test_loss"], abs=1e-6)
