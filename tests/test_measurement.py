"""The figures the tools report: peak memory (bench, trainer, compare) and the logged rates."""

import gc
import math
import weakref

import pytest
import torch

import fba
from fba.bench import runner
from fba.config import resolve_config

SMALL = ["model=resnet8", "K=4"]


def test_a_deleted_learner_is_freed_at_once_not_at_the_next_gc_pass():
    fba.build_learner(model="resnet8", K=4)  # first-import work keeps its own frames alive; not ours
    gc.collect()
    gc.disable()
    try:
        for method in ("bp", "fba", "dgl"):
            learner = fba.build_learner(model="resnet8", K=4, method=method)
            learner_ref, weight_ref = weakref.ref(learner), weakref.ref(next(learner.plain.parameters()))
            del learner
            assert learner_ref() is None and weight_ref() is None, f"{method}: a reference cycle keeps the learner"
    finally:
        gc.enable()


def test_memory_figures_do_not_depend_on_which_method_was_measured_before():
    cfg = resolve_config(None, SMALL)
    measure = dict(batch_size=8, input_size=16, num_samples=64)
    first = {r["method"]: r["peak_bytes"] for r in runner.measure_memory(cfg, ["bp", "fba"], **measure)}
    second = {r["method"]: r["peak_bytes"] for r in runner.measure_memory(cfg, ["fba", "bp"], **measure)}
    assert first == second


def test_device_breakdown_counts_only_tensors_on_the_measured_device():
    from fba.bench.memory import _bytes

    on_cpu = torch.zeros(1000)  # e.g. a long-term bank kept on the host while a GPU is measured
    assert _bytes([on_cpu, on_cpu[:10]], torch.device("cpu")) == 4000
    assert _bytes([on_cpu], torch.device("cuda")) == 0
    assert _bytes([on_cpu], torch.device("cuda", 0)) == 0


@pytest.fixture(scope="module")
def two_epoch_runs(tmp_path_factory):
    """Two short digits runs (bp and fba) through the trainer, with their learners."""
    from fba.training.trainer import Trainer

    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("bp", "fba"):
        cfg = resolve_config(None, [*SMALL, f"method={method}", "train.epochs=2", "train.progress=false",
                                    "data.batch_size=64", f"train.runs_dir={runs}"])
        trainer = Trainer(cfg, log=lambda m: None)
        out[method] = (trainer, trainer.fit())
    return out


@pytest.mark.parametrize("method", ["bp", "fba"])
def test_trainer_peak_memory_equals_fba_bench_memory(two_epoch_runs, method):
    trainer, summary = two_epoch_runs[method]
    info = trainer.info
    (row,) = runner.measure_memory(trainer.cfg, [method], batch_size=64, input_size=8, in_channels=info.in_channels,
                                   num_classes=info.num_classes, num_samples=info.num_train)
    # The steady state: the momentum buffers that the first step creates are counted.
    assert summary["peak_memory_bytes"] == row["peak_bytes"]


def test_epoch_rows_report_the_learning_rate_the_epoch_used(two_epoch_runs):
    trainer, _ = two_epoch_runs["fba"]
    steps = trainer.steps_per_epoch
    total, warmup = 2 * steps, steps  # warmup_epochs=1 by default, then cosine to zero
    lr = trainer.cfg["optim"]["lr"]
    last_step_rate = lr * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup)))
    assert trainer.rows[0]["lr"] == pytest.approx(lr)  # the last warm-up step runs at the full rate
    assert trainer.rows[-1]["lr"] == pytest.approx(last_step_rate) and trainer.rows[-1]["lr"] > 0


def test_sr_early_map_counts_as_an_activation_not_as_the_bank():
    cfg = resolve_config(None, ["task=super_resolution", "model=edsr_tiny", "K=3"])
    rows = runner.measure_memory(cfg, ["bp", "fba"], batch_size=2, input_size=8, num_samples=8)
    fba_row = rows[1]
    assert fba_row["bank"] == 0 and fba_row["bank_storage_bytes"] == 0
    assert fba_row["activations"] > 0


def test_method_rows_take_options_and_one_key_overrides():
    assert runner.parse_method_spec("fba") == ("fba", {}, None)
    assert runner.parse_method_spec("fba+checkpoint+pipeline") == ("fba", {"checkpoint": True}, "pipeline")
    assert runner.parse_method_spec("fba+checkpoint=[0]+det.fpn_channels=128") == (
        "fba", {"checkpoint": [0], "det.fpn_channels": 128}, None)
    with pytest.raises(fba.errors.ConfigError, match="unknown row option 'fast'"):
        runner.parse_method_spec("fba+fast")


def test_methods_list_splits_rows_only_outside_brackets():
    from fba.cli import _methods_arg

    assert _methods_arg("bp, fba+checkpoint=[0,1],fba+det.anchor_sizes=[[16],[32,40]]") == [
        "bp", "fba+checkpoint=[0,1]", "fba+det.anchor_sizes=[[16],[32,40]]"]
    assert runner.parse_method_spec(_methods_arg("fba+checkpoint=[0,2]")[0]) == ("fba", {"checkpoint": [0, 2]}, None)
    for bad in ("fba+checkpoint=[0,1", ",", "fba]", "fba+checkpoint=0],[1"):
        with pytest.raises(fba.errors.ConfigError, match="--methods"):
            _methods_arg(bad)


def test_a_row_override_reaches_only_its_row():
    cfg = resolve_config(None, ["model=resnet8", "K=4"])
    rows = runner.measure_memory(cfg, ["fba", "fba+checkpoint=[0, 1, 2, 3]", "fba+checkpoint=true"], batch_size=8,
                                 input_size=16, num_samples=16)
    peaks = [row["peak_bytes"] for row in rows]
    assert [row["method"] for row in rows] == ["fba", "fba+checkpoint=[0, 1, 2, 3]", "fba+checkpoint=true"]
    assert peaks[1] == peaks[2] != peaks[0]  # all four modules listed is checkpoint=true
