"""checkpoint=true: activation checkpointing inside each local module, for any method."""

import pytest
import torch

import fba
from conftest import assert_perturbing_aux_changes_only_its_module, tiny_batch
from fba.bench import runner
from fba.config import resolve_config

SR = dict(task="super_resolution", model="edsr_tiny")


def _sr_batch(n=4, size=8, scale=2):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size * scale, size * scale, generator=g)


def _same_state(a, b, exact: bool) -> None:
    for (name, p), q in zip(a.plain.state_dict().items(), b.plain.state_dict().values()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("opts, batch", [(dict(model="resnet8", num_classes=10), tiny_batch(size=16)), (SR, _sr_batch())])
def test_K1_with_checkpoint_equals_bp_checkpoint(opts, batch):
    local = fba.build_learner(**opts, method="fba", K=1, checkpoint=True)
    reference = fba.build_learner(**opts, method="bp_checkpoint")
    reference.plain.load_state_dict(local.plain.state_dict())
    for _ in range(2):
        assert local.train_step(*batch)["loss"] == reference.train_step(*batch)["loss"]
    _same_state(local, reference, exact=True)


@pytest.mark.parametrize("checkpoint", [True, [0], [1, 2]])
@pytest.mark.parametrize("method", ["fba", "dgl"])
@pytest.mark.parametrize("opts, batch", [(dict(model="resnet8", num_classes=10, K=4), (*tiny_batch(size=16), torch.arange(8))),
                                         (dict(SR, K=3), (*_sr_batch(), None))])
def test_checkpoint_changes_memory_not_the_step(method, opts, batch, checkpoint):
    """Same parameters and BatchNorm statistics after two steps: the recomputation counts nothing twice."""
    plain = fba.build_learner(**opts, method=method, num_samples=8)
    ckpt = fba.build_learner(**opts, method=method, num_samples=8, checkpoint=checkpoint)
    ckpt.load_state_dict(plain.state_dict())
    for _ in range(2):
        plain.train_step(*batch)
        ckpt.train_step(*batch)
    _same_state(plain, ckpt, exact=False)


@pytest.mark.parametrize("method", ["fba", "dgl"])
def test_checkpoint_keeps_gradient_isolation(method):
    x, y = tiny_batch(size=16)
    build = lambda: fba.build_learner(model="resnet8", K=4, num_classes=10, method=method, checkpoint=True,  # noqa: E731
                                      num_samples=8, **{"optim.step": "global"})
    assert_perturbing_aux_changes_only_its_module(build, (x, y, torch.arange(8)), j=1)


def test_a_list_checkpoints_only_the_named_modules():
    from fba.engine.checkpointing import CheckpointedUnits

    learner = fba.build_learner(**SR, method="fba", K=3, checkpoint=[0, 2])
    assert [isinstance(m, CheckpointedUnits) for m in learner.local_modules] == [True, False, True]
    # the per-sample tail belongs to the last module, so it is checkpointed with it
    assert learner.plain.tail.checkpoint_chunks > 0
    assert learner.aux_nets[0].tail.checkpoint_chunks > 0 and learner.aux_nets[1].tail.checkpoint_chunks == 0
    assert fba.build_learner(**SR, method="fba", K=3, checkpoint=[1]).plain.tail.checkpoint_chunks == 0


def test_a_list_is_ignored_by_end_to_end_methods():
    from fba.engine.checkpointing import CheckpointedUnits

    bp = fba.build_learner(model="resnet8", num_classes=10, method="bp", checkpoint=[0])
    assert not any(isinstance(m, CheckpointedUnits) for m in bp.local_modules)


@pytest.mark.parametrize("value, message", [([], "a list of distinct module indices"),
                                            ([-1], "a list of distinct module indices"),
                                            ([0, 0], "a list of distinct module indices"),
                                            ("yes", "a list of distinct module indices"),
                                            ([4], "module 4 does not exist, the 4 local modules are 0..3")])
def test_bad_checkpoint_values_are_one_line_errors(value, message):
    with pytest.raises(fba.FBAError, match=message):
        fba.build_learner(model="resnet8", num_classes=10, method="fba", K=4, checkpoint=value)


def test_export_carries_no_checkpointing():
    learner = fba.build_learner(**SR, method="fba", K=3, checkpoint=True)
    assert learner.plain.tail.checkpoint_chunks > 0
    assert all(getattr(m, "checkpoint_chunks", 0) == 0 for m in learner.export().modules())


def test_checkpoint_peaks_below_plain_fba_and_near_bp_checkpoint():
    rows = {}
    for checkpoint in (False, True):
        cfg = resolve_config(None, ["model=resnet20", "K=4", f"checkpoint={str(checkpoint).lower()}"])
        methods = ["bp", "bp_checkpoint", "fba"] if not checkpoint else ["fba"]
        for row in runner.measure_memory(cfg, methods, batch_size=16, input_size=32, num_samples=64):
            rows[row["method"] + ("+checkpoint" if checkpoint else "")] = row["peak_bytes"]
    assert rows["fba+checkpoint"] < rows["fba"] < rows["bp"] and rows["bp_checkpoint"] < rows["bp"]
    # Both keep only unit inputs, and both peak on the full-resolution stage: with the light
    # default SLM the two are within 10% (docs/scaling.md), neither clearly below the other.
    assert rows["fba+checkpoint"] <= 1.1 * rows["bp_checkpoint"]
