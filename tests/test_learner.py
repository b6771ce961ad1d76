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


def test_unknown_option_is_a_config_error():
    with pytest.raises(fba.FBAError, match="unknown config key 'fba.bank.sauce'"):
        fba.build_learner(model="resnet8", **{"fba.bank.sauce": "inpass"})
