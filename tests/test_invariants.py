"""The invariants of DESIGN section 1, each enforced here."""

import copy

import pytest
import torch
import torchvision

import fba
from fba.errors import FBAError
from fba.bench import peak_memory

from conftest import assert_perturbing_aux_changes_only_its_module, tiny_batch

NO_MOMENTUM = {"optim": {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False}}

# Every shape the classification SLM can take; each invariant below holds for all of them.
def _slm(grid: int, hidden: int, pool: int, stride: int, reduction: int, **extra) -> dict:
    return {"fba.head_grid": grid, "fba.head_hidden": hidden, "fba.input_pool": pool, "fba.block_stride": stride,
            "fba.reduction": reduction, **extra}


SLM_VARIANTS = {
    "default": {},
    "stage_tail": _slm(1, 0, 1, 1, 1),
    "grid_head": _slm(2, 0, 1, 1, 1),
    "light": _slm(2, 0, 1, 2, 2),
    "light_mlp_input_bank": _slm(2, 2, 1, 2, 4, **{"fba.bank.usage": "input"}),
    "pooled_mlp_head": _slm(2, 2, 4, 1, 2),
    "paper": {"fba.preset": "paper"},
}


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("step", ["global", "per_module"])
@pytest.mark.parametrize("source", ["inpass", "longterm", "lookahead", "none"])
def test_perturbing_aux_j_changes_only_module_j(step, source):
    x, y = tiny_batch()
    kwargs = dict(model="resnet8", method="fba", K=4, num_classes=10, num_samples=32,
                  **{"optim.step": step, "fba.bank.source": source})
    assert_perturbing_aux_changes_only_its_module(lambda: fba.build_learner(**kwargs), (x, y, torch.arange(len(y))))


@pytest.mark.parametrize("variant", SLM_VARIANTS)
def test_slm_variants_keep_gradients_isolated(variant):
    x, y = tiny_batch()
    kwargs = dict(model="resnet8", method="fba", K=4, num_classes=10, num_samples=32, **SLM_VARIANTS[variant])
    assert_perturbing_aux_changes_only_its_module(lambda: fba.build_learner(**kwargs), (x, y, torch.arange(len(y))))


@pytest.mark.parametrize("variant", SLM_VARIANTS)
def test_each_local_loss_reaches_only_its_module_and_aux(variant):
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, num_samples=32, **SLM_VARIANTS[variant])
    x, y = tiny_batch()
    seen = {}
    for k in range(learner.K):
        for name, p in list(learner.local_modules[k].named_parameters()) + (
                list(learner.aux_nets[k].named_parameters()) if k < learner.K - 1 else list(learner.head.named_parameters())):
            p.register_post_accumulate_grad_hook(lambda p, k=k: seen.setdefault(id(p), set()).add(k))
    calls = []
    original = learner._backward
    learner._backward = lambda loss: (calls.append(len(calls)), original(loss))
    indices = torch.arange(len(y))
    owner = {}
    for k in range(learner.K):
        mods = [learner.local_modules[k], learner.aux_nets[k] if k < learner.K - 1 else learner.head]
        for m in mods:
            for p in m.parameters():
                owner[id(p)] = k
    learner.train_step(x, y, indices)
    learner.train_step(x, y, indices)  # the second visit reads the long-term bank (default)
    assert len(calls) == 2 * learner.K  # one backward per module, never one summed backward
    assert set(seen) == set(owner)  # every module, aux and head parameter was trained
    for pid, ks in seen.items():
        assert ks == {owner[pid]}


@pytest.mark.parametrize("model,variant", [("resnet8", v) for v in SLM_VARIANTS] + [("resnet18", "stage_tail")])
def test_K1_fba_equals_bp(model, variant):
    x, y = tiny_batch(size=32)
    torch.manual_seed(0)
    local = fba.build_learner(model=model, method="fba", K=1, num_classes=10, **SLM_VARIANTS[variant])
    bp = fba.build_learner(model=model, method="bp", num_classes=10)
    bp.plain.load_state_dict(local.plain.state_dict())
    for _ in range(2):
        lo, bo = local.train_step(x, y), bp.train_step(x, y)
        assert lo["loss"] == bo["loss"]
    for p, q in zip(local.plain.state_dict().values(), bp.plain.state_dict().values()):
        assert torch.equal(p, q)


def test_bp_checkpoint_matches_bp_including_batchnorm_statistics():
    x, y = tiny_batch(size=16)
    ckpt = fba.build_learner(model="resnet8", method="bp_checkpoint", num_classes=10)
    bp = fba.build_learner(model="resnet8", method="bp", num_classes=10)
    bp.plain.load_state_dict(ckpt.plain.state_dict())
    for _ in range(2):
        ckpt.train_step(x, y)
        bp.train_step(x, y)
    for (name, p), q in zip(ckpt.plain.state_dict().items(), bp.plain.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", SLM_VARIANTS)
def test_export_equals_learner_eval_and_loads_strictly_into_torchvision(variant):
    learner = fba.build_learner(model="resnet18", method="fba", K=4, num_classes=10, num_samples=8, **SLM_VARIANTS[variant])
    x, y = tiny_batch(size=32)
    learner.train_step(x, y, torch.arange(8))
    learner.train_step(x, y, torch.arange(8))  # the second visit reads the long-term bank
    learner.eval()
    exported = learner.export()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), learner(x), rtol=0, atol=0)
    names = {n for n, _ in exported.named_parameters()}
    assert not any(n.startswith(("aux", "block", "fusion")) for n in names)
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in learner.plain.parameters())
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    reference.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), learner(x))


def test_export_is_a_copy_not_a_view():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10)
    exported = learner.export()
    x, y = tiny_batch()
    learner.train_step(x, y)
    assert not all(torch.equal(p, q) for p, q in zip(exported.parameters(), learner.plain.parameters()))


@pytest.mark.parametrize("source", ["inpass", "longterm", "lookahead"])
def test_bank_holds_no_autograd_history_and_is_unused_in_eval(source):
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, num_samples=16,
                                **{"fba.bank.source": source})
    x, y = tiny_batch()
    read, seen = learner.bank.read, []

    def spy(k, device):
        features, valid = read(k, device)
        seen.extend(learner.bank.tensors())
        return features, valid

    learner.bank.read = spy
    learner.train_step(x, y, torch.arange(8))
    assert seen, "the bank should hold features while the step runs"
    assert all(not t.requires_grad and t.grad_fn is None for t in seen + learner.bank.tensors())
    before = [t.clone() for t in learner.bank.tensors()]
    learner.eval()
    with torch.no_grad():
        learner(x)
    after = learner.bank.tensors()
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def test_longterm_bank_is_read_at_the_next_visit():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, num_samples=20,
                                **{"fba.bank.source": "longterm"})
    x, y = tiny_batch()
    idx = torch.arange(3, 11)
    learner.train_step(x, y, idx)
    assert learner.bank.filled[idx].all() and not learner.bank.filled[:3].any()
    features, valid = learner.bank.read(0, torch.device("cpu"))
    assert valid.all() and features.shape == (8, 64)


def test_per_module_stepping_frees_gradients():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, **{"optim.step": "per_module"})
    x, y = tiny_batch()
    learner.train_step(x, y)
    assert all(p.grad is None for p in learner.parameters())
    assert len(learner.optimizers) == 4


def test_local_step_frees_each_module_graph():
    """Peak memory of FBA is well below BP's (deterministic CPU tracker)."""
    x, y = tiny_batch(n=32, size=32)
    peaks = {}
    for method, K in [("bp", 1), ("fba", 10)]:
        learner = fba.build_learner(model="resnet20", method=method, K=K, num_classes=10)
        peaks[method] = peak_memory(lambda: learner.train_step(x, y),
                                    existing=[x, y, *learner.parameters()])["peak_bytes"]
    assert peaks["fba"] < 0.5 * peaks["bp"]


def test_shared_head_is_the_main_head():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, **{"fba.share_head": True})
    assert all(aux.head is learner.head for aux in learner.aux_nets)
    # the folded grid and MLP reach the shared head through a 1x1 adapter to its width
    adapters = [aux.adapter for aux in learner.aux_nets if aux.adapter is not None]
    assert adapters and all(a.out_channels == 64 and a.in_channels % 4 == 0 for a in adapters)
    x, y = tiny_batch()
    out = learner.train_step(x, y)
    assert torch.isfinite(torch.tensor(out["loss"]))


def test_inpass_bank_reads_the_latest_module_of_each_stage():
    from fba.engine.bank import inpass_sources

    stages = [0, 1, 1, 1, 2, 2, 3]
    assert inpass_sources(stages, 0) == []
    assert inpass_sources(stages, 3) == [0, 2]
    assert inpass_sources(stages, 6) == [0, 3, 5]
    learner = fba.build_learner(model="resnet101", K=34, num_classes=10, **{"fba.bank.source": "inpass", "fba.bank.usage": "input"})
    widths = [aux.fusion.proj.in_features for aux in learner.aux_nets if aux.fusion is not None]
    assert max(widths) <= 64 + 256 + 512 + 1024 + 2048


def test_longterm_bank_grows_without_num_samples():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, **{"fba.bank.source": "longterm"})
    x, y = tiny_batch()
    learner.train_step(x, y, torch.arange(100, 108))
    assert learner.bank.table.shape[0] >= 108 and learner.bank.filled[100:108].all()
    table = learner.bank.table.clone()
    with pytest.warns(UserWarning, match="needs the dataset indices"):
        learner.train_step(x, y)
    assert torch.equal(learner.bank.table, table)


def test_paper_preset_fuses_the_longterm_bank_into_a_full_stage_tail_slm():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, num_samples=8, **{"fba.preset": "paper"})
    assert learner.bank.source == "longterm"
    assert all(aux.fusion is not None and aux.fold is None and aux.target_proj is None for aux in learner.aux_nets)
    assert learner.aux_nets[0].block.conv1.stride == (1, 1)


@pytest.mark.parametrize("extra", [{"fba.input_pool": 2}, {"fba.bank.source": "inpass"}])
def test_paper_preset_refuses_a_key_set_against_it(extra):
    # It used to win silently, while the saved config showed the user's value.
    with pytest.raises(FBAError, match="fba.preset=paper sets .* but the config sets it to"):
        fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, **{"fba.preset": "paper", **extra})
    # The preset's own value, or a key left at its default, is no conflict.
    fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, num_samples=8,
                      **{"fba.preset": "paper", "fba.input_pool": 1, "fba.reduction": 1})


def test_default_slm_pools_its_input_and_ends_in_a_grid_mlp_head():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10)
    aux = learner.aux_nets[0]
    assert isinstance(aux.pool, torch.nn.AvgPool2d) and aux.pool.kernel_size == 4
    assert aux.head.fc.in_features == 16 * 2 * 2 and len(aux.fold.mlp) == 6


def test_light_slm_runs_strided_narrow_block_and_grid_head():
    learner = fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, **_slm(2, 0, 1, 2, 2))
    aux = learner.aux_nets[0]
    assert aux.block.conv1.stride == (2, 2) and aux.block.conv1.out_channels == 8
    assert aux.head.fc.in_features == 8 * 2 * 2


@pytest.mark.parametrize("override,message", [({"fba.head_grid": 0}, "fba.head_grid"),
                                              ({"fba.block_stride": -1}, "fba.block_stride"),
                                              ({"fba.preset": "papr"}, "did you mean 'paper'"),
                                              ({"fba.input_pool": 0}, "fba.input_pool"),
                                              ({"fba.head_hidden": -1}, "fba.head_hidden"),
                                              ({"fba.head_grid": -2}, "fba.head_grid")])
def test_bad_slm_options_are_rejected(override, message):
    with pytest.raises((FBAError, ValueError), match=message):
        fba.build_learner(model="resnet8", method="fba", K=4, num_classes=10, **override)


def test_fba_steps_per_module_by_default_with_the_weights_of_a_global_step():
    x, y = tiny_batch()
    kwargs = dict(model="resnet8", method="fba", K=4, num_classes=10, num_samples=8)
    per_module = fba.build_learner(**kwargs)
    global_step = fba.build_learner(**kwargs, **{"optim.step": "global"})
    assert per_module.step_mode == "per_module" and len(per_module.optimizers) == 4
    for _ in range(3):
        per_module.train_step(x, y, torch.arange(8))
        global_step.train_step(x, y, torch.arange(8))
    for (name, p), q in zip(per_module.state_dict().items(), global_step.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
