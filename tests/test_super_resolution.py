"""Super-resolution: EDSR units, FBA's SR local modules and bank, x2 -> x3/x4 init, CLI."""

import json
from pathlib import Path

import pytest
import torch

import fba
from conftest import assert_perturbing_aux_changes_only_its_module
from fba.cli import main
from fba.tasks.super_resolution.models import SR_MODELS, EDSR, MeanShift, ReconstructionTail, ResBlock

SR = dict(task="super_resolution", model="edsr_tiny")
TINY_RUN = ["task=super_resolution", "model=edsr_tiny", "K=3", "sr.patch_size=12", "sr.patches_per_epoch=8",
            "data.batch_size=4", "sr.eval_crop=48", "train.epochs=1", "train.progress=false"]


def sr_batch(n=4, size=8, scale=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size * scale, size * scale, generator=g)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", fba.list_models("super_resolution"))
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_units_and_tail_equal_the_plain_edsr(name, scale):
    if name == "edsr_large" and scale != 2:
        pytest.skip("one scale suffices for the 40 M-parameter model")
    model = SR_MODELS.get(name)(scale=scale)
    x = torch.rand(1, 3, 6, 6)
    h = x
    for unit in model.units:
        h = unit(h)
    out = model.head(h)
    assert out.shape == (1, 3, 6 * scale, 6 * scale)
    torch.testing.assert_close(out, model.plain(x))


def test_edsr_sizes_match_the_published_models():
    # EDSR paper: baseline 1.37 M parameters, large 43 M at x4 (40.7 M at x2).
    baseline = SR_MODELS.get("edsr_baseline")(scale=2)
    assert sum(p.numel() for p in baseline.plain.parameters()) == 1_369_859
    assert len(baseline.units) == 18  # head conv + 16 ResBlocks + body conv
    large = SR_MODELS.get("edsr_large")(scale=4)
    assert 43.0e6 < sum(p.numel() for p in large.plain.parameters()) < 43.2e6
    assert large.plain.body[0].res_scale == 0.1
    # The mean shift is a buffer: saved with the model, never trained.
    assert not any(isinstance(m, MeanShift) and list(m.parameters()) for m in baseline.plain.modules())
    assert "sub_mean.shift" in baseline.plain.state_dict()


@pytest.mark.parametrize("step", ["global", "per_module"])
@pytest.mark.parametrize("method", ["fba", "dgl"])
def test_sr_gradient_isolation(method, step):
    kwargs = dict(**SR, method=method, K=3, **{"optim.step": step})
    assert_perturbing_aux_changes_only_its_module(lambda: fba.build_learner(**kwargs), (*sr_batch(), None), scale=0.1)


def test_global_skip_reads_the_early_map_detached_across_modules():
    learner = fba.build_learner(**SR, method="fba", K=3)
    assert learner.plain is not None and learner.groups[0][0] == 0
    early = learner.bank.early
    assert early.detach  # head conv (module 0) and body conv (module 2) are in different modules
    seen = []
    head_conv = learner.plain.head
    head_conv.weight.register_hook(lambda g: seen.append(g))
    lr, hr = sr_batch()
    learner.train_step(lr, hr)
    assert len(seen) == 1  # only module 0's own loss reached the head conv
    features, _ = learner.bank.read(1, lr.device)
    assert features is not None and not features.requires_grad
    # One module: the skip keeps its gradient, as in the plain EDSR.
    one = fba.build_learner(**SR, method="fba", K=1)
    assert one.bank is None and not one.plain.head.weight.grad
    assert not fba.build_learner(**SR, method="bp").units[0].module[0].early.detach


def test_K1_fba_and_bp_checkpoint_equal_bp():
    lr, hr = sr_batch()
    bp = fba.build_learner(**SR, method="bp")
    for method, K in (("fba", 1), ("bp_checkpoint", 1)):
        other = fba.build_learner(**SR, method=method, K=K)
        other.plain.load_state_dict(bp.plain.state_dict())
        ref = fba.build_learner(**SR, method="bp")
        ref.plain.load_state_dict(bp.plain.state_dict())
        for _ in range(2):
            assert other.train_step(lr, hr)["loss"] == ref.train_step(lr, hr)["loss"]
        # bp_checkpoint runs the tail in batch chunks: its weight gradients are sums of the
        # chunks' sums, a reordered reduction.
        atol = 1e-6 if method == "bp_checkpoint" else 1e-7
        for p, q in zip(other.plain.parameters(), ref.plain.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=atol)


def test_sr_local_module_is_a_resblock_and_a_reconstruction_tail():
    learner = fba.build_learner(**SR, method="fba", K=4)
    for aux in learner.aux_nets:
        assert isinstance(aux.block, ResBlock) and isinstance(aux.tail, ReconstructionTail)
        assert aux.tail is not learner.head
    shared = fba.build_learner(**SR, method="fba", K=4, **{"fba.share_head": True})
    assert all(aux.tail is shared.head for aux in shared.aux_nets)
    # The bank off: the SLM gets no early map.
    off = fba.build_learner(**SR, method="fba", K=4, **{"fba.bank.source": "none"})
    assert off.bank is None
    lr, hr = sr_batch()
    assert torch.isfinite(torch.tensor(off.train_step(lr, hr)["loss"]))
    # Channel-reduced SLM tails are narrower.
    reduced = fba.build_learner(**SR, method="fba", K=4, **{"fba.reduction": 2})
    assert reduced.aux_nets[0].tail.conv.in_channels == 8
    assert torch.isfinite(torch.tensor(reduced.train_step(lr, hr)["loss"]))


def test_bank_adds_the_early_map_to_the_slm():
    learner = fba.build_learner(**SR, method="fba", K=3)
    lr, _ = sr_batch()
    learner.eval()
    with torch.no_grad():
        h0 = learner.local_modules[0](lr)
        aux = learner.aux_nets[0]
        with_bank, _ = aux(h0, learner.bank.read(0, h0.device)[0])
        without, _ = aux(h0, None)
    assert not torch.equal(with_bank, without)


def test_sr_bank_must_be_the_early_map():
    with pytest.raises(fba.FBAError, match="inpass"):
        fba.build_learner(**SR, method="fba", K=3, **{"fba.bank.source": "longterm"})


def test_export_equals_learner_eval_and_is_a_plain_edsr():
    learner = fba.build_learner(**SR, method="fba", K=3)
    lr, hr = sr_batch()
    learner.train_step(lr, hr)
    learner.eval()
    exported = learner.export()
    assert isinstance(exported, EDSR)
    with torch.no_grad():
        torch.testing.assert_close(exported(lr), learner(lr), rtol=0, atol=0)
    assert not any(k.startswith("aux") for k in exported.state_dict())


def test_x3_and_x4_start_from_a_trained_x2(tmp_path):
    from safetensors.torch import save_file

    from fba.training.checkpoint import init_from_checkpoint

    x2 = fba.build_learner(**SR, method="bp")
    x2.train_step(*sr_batch())
    path = tmp_path / "x2.safetensors"
    save_file(x2.weights(), str(path))
    for scale in (3, 4):
        learner = fba.build_learner(**SR, method="fba", K=3, init_from=str(path), **{"sr.scale": scale})
        x2_state, state = x2.plain.state_dict(), learner.plain.state_dict()
        for name, tensor in state.items():
            if name.startswith("tail.upsampler."):
                continue
            assert torch.equal(tensor, x2_state[name]), name
        assert not torch.equal(state["tail.upsampler.0.weight"][:x2_state["tail.upsampler.0.weight"].shape[0]],
                               x2_state["tail.upsampler.0.weight"])
    with pytest.raises(fba.FBAError, match="shape"):
        fba.build_learner(task="super_resolution", model="edsr_baseline", method="bp", init_from=str(path))
    with pytest.raises(fba.FBAError, match="not found"):
        fba.build_learner(**SR, method="bp", init_from=str(tmp_path / "missing.safetensors"))


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("sr_runs")
    code = main(["train", *TINY_RUN, f"train.runs_dir={runs}", "--json"])
    assert code == 0
    return next(runs.iterdir())


def test_sr_train_reports_psnr_ssim_bicubic_and_memory(sr_run):
    summary = json.loads((sr_run / "summary.json").read_text())
    assert {"psnr", "ssim", "psnr_bicubic", "ssim_bicubic", "peak_memory_bytes"} <= set(summary)
    assert summary["task"] == "super_resolution" and summary["K"] == 3
    assert 0 < summary["psnr"] < 60 and 20 < summary["psnr_bicubic"] < 40 and 0 < summary["ssim"] <= 1
    assert summary["peak_memory_bytes"] > 0
    assert (sr_run / "curves.png").is_file()


def test_eval_writes_super_resolved_pngs(capsys, sr_run, tmp_path):
    from PIL import Image

    images = tmp_path / "lr"
    images.mkdir()
    Image.new("RGB", (10, 7), (120, 30, 200)).save(images / "a.png")
    Image.new("RGB", (6, 9), (10, 250, 0)).save(images / "b.jpg")
    out = tmp_path / "sr"
    code, stdout, _ = run_cli(capsys, "eval", str(sr_run), "--images", str(images), "--out", str(out), "--json")
    assert code == 0 and json.loads(stdout)["images"] == 2
    assert Image.open(out / "a.png").size == (20, 14) and Image.open(out / "b.png").size == (12, 18)
    # On the validation set: the metrics equal the run's last evaluation.
    code, stdout, _ = run_cli(capsys, "eval", str(sr_run), "--json", "--out", str(tmp_path / "val"))
    result = json.loads(stdout)
    assert code == 0
    assert result["psnr"] == pytest.approx(json.loads((sr_run / "summary.json").read_text())["psnr"], abs=1e-6)
    assert len(list((tmp_path / "val").glob("*.png"))) == 3


@pytest.mark.parametrize("argv, fragment", [
    (["train", "task=super_resolution", "sr.scale=5"], "sr.scale"),
    (["train", "task=super_resolution", "model=edsr_huge"], "edsr_baseline"),
    (["train", "task=super_resolution", "fba.bank.source=longterm", "model=edsr_tiny"], "inpass"),
    (["eval", "/nonexistent/run", "--images", "/tmp"], "neither a run folder"),
])
def test_sr_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("fba: error:") and fragment in err and len(err.strip().splitlines()) == 1


def test_benchmark_folder_is_for_evaluation_only(capsys, tmp_path):
    from PIL import Image

    (tmp_path / "HR").mkdir()
    Image.new("RGB", (24, 24), (1, 2, 3)).save(tmp_path / "HR" / "baby.png")
    code, _, err = run_cli(capsys, "train", *TINY_RUN, "data.name=benchmark", f"data.root={tmp_path}",
                           f"train.runs_dir={tmp_path / 'runs'}")
    assert code == 2 and "no training split" in err and len(err.strip().splitlines()) == 1


def test_sr_bench_memory_uses_lr_and_hr_patches(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "bench", "memory", "task=super_resolution", "model=edsr_tiny", "K=3",
                           "--methods", "bp,fba", "--batch-size", "2", "--input-size", "8", "--num-samples", "8",
                           "--out", str(tmp_path), "--json", "--quiet")
    rows = json.loads(out)["rows"]
    assert code == 0 and [r["method"] for r in rows] == ["bp", "fba"]
    assert all(r["peak_bytes"] > 0 for r in rows)
