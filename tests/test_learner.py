"""LocalLearner behaviour beyond the core invariants: API forms, precision, persistence."""

import pytest
import torch

import fba
from fba.errors import NonFiniteLossError

from conftest import tiny_batch


def test_build_learner_accepts_file_dict_and_keywords(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet8\nK: 2\nfba:\n  reduction: 2\n")
    from_file = fba.build_learner(str(path), num_classes=5)
    from_dict = fba.build_learner({"model": "resnet8", "K": 2, "fba": {"reduction": 2}}, num_classes=5)
    from_kwargs = fba.build_learner(model="resnet8", K=2, num_classes=5, fba={"reduction": 2})
    for learner in (from_file, from_dict, from_kwargs):
        assert learner.K == 2 and learner.aux_nets[0].block.conv1.out_channels == 8
        assert learner.plain.fc.out_features == 5


def test_train_step_returns_floats_for_every_module():
    learner = fba.build_learner(model="resnet8", K=4, num_classes=10)
    out = learner.train_step(*tiny_batch())
    assert set(out) == {"loss", "lr", "loss/0", "loss/1", "loss/2", "loss/3"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["loss"] == out["loss/3"]


def test_bf16_autocast_on_cpu():
    learner = fba.build_learner(model="resnet8", K=4, num_classes=10, precision="bf16")
    out = learner.train_step(*tiny_batch())
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert all(p.dtype == torch.float32 for p in learner.parameters())


def test_nan_loss_raises_before_any_update():
    learner = fba.build_learner(model="resnet8", K=4, num_classes=10)
    x, y = tiny_batch()
    before = [p.clone() for p in learner.local_modules[0].parameters()]
    with pytest.raises(NonFiniteLossError, match="loss of module 0 is nan"):
        learner.train_step(x * float("nan"), y)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.local_modules[0].parameters()))


@pytest.mark.parametrize("share_head", [False, True])
def test_weights_round_trip(share_head):
    a = fba.build_learner(model="resnet8", K=4, num_classes=10, **{"fba.share_head": share_head})
    a.train_step(*tiny_batch())
    b = fba.build_learner(model="resnet8", K=4, num_classes=10, seed=1, **{"fba.share_head": share_head})
    b.load_weights(a.weights())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_schedule_warms_up_then_decays():
    learner = fba.build_learner(model="resnet8", K=2, num_classes=10, total_steps=10, steps_per_epoch=4,
                                optim={"lr": 0.1, "warmup_epochs": 1})
    lrs = [learner.train_step(*tiny_batch())["lr"] for _ in range(10)]
    assert lrs[0] < lrs[2] < lrs[3] and lrs[3] == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01


@pytest.mark.parametrize("step", ["global", "per_module"])
@pytest.mark.parametrize("method", ["fba", "dgl", "infopro"])
def test_aux_lr_scale_sets_the_auxiliary_rate_alone(method, step):
    """Every auxiliary parameter follows lr x scale through warm-up and decay; the backbone's
    rate is the run's; each parameter is stepped by exactly one optimizer."""
    kwargs = dict(model="resnet8", K=4, num_classes=10, num_samples=64, method=method, total_steps=6, steps_per_epoch=2)
    learner = fba.build_learner(**kwargs, optim={"lr": 0.05, "step": step, "aux_lr_scale": 0.25})
    aux = {id(p) for net in learner.aux_nets for p in net.parameters()}
    backbone = {id(p) for p in learner.plain.parameters()}
    for _ in range(3):
        learner.train_step(*tiny_batch())
        rates = {id(p): group["lr"] for opt in learner.optimizers for group in opt.param_groups for p in group["params"]}
        assert len(rates) == sum(len(g["params"]) for o in learner.optimizers for g in o.param_groups)
        assert set(rates) == aux | backbone
        main_rate = next(rates[i] for i in backbone)
        assert all(rates[i] == pytest.approx(main_rate) for i in backbone)
        assert all(rates[i] == pytest.approx(0.25 * main_rate) for i in aux)
    same = fba.build_learner(**kwargs, optim={"lr": 0.05, "step": step})
    assert [len(o.param_groups) for o in same.optimizers] == [1] * len(same.optimizers)  # 1.0: one group, as before


def test_aux_lr_scale_zero_is_refused():
    with pytest.raises(fba.FBAError, match="'optim.aux_lr_scale': expected a finite positive number"):
        fba.build_learner(model="resnet8", optim={"aux_lr_scale": 0})


def test_unknown_option_is_a_config_error():
    with pytest.raises(fba.FBAError, match="unknown config key 'fba.bank.sauce'"):
        fba.build_learner(model="resnet8", **{"fba.bank.sauce": "inpass"})
