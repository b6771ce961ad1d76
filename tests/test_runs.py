"""Run folders over time: resume, export and eval after the sources are gone; library hygiene."""

import shutil

import pytest
import torch

import fba
from fba.config import resolve_config
from fba.training.trainer import Trainer

FAST = ["model=resnet8", "K=4", "train.progress=false", "data.batch_size=128"]


def quiet(msg):
    pass


def test_resume_does_not_need_the_init_from_source(tmp_path):
    source = Trainer(resolve_config(None, [*FAST, "train.epochs=1", "train.name=source", f"train.runs_dir={tmp_path}"]),
                     log=quiet)
    source.fit()
    child = Trainer(resolve_config(None, [*FAST, "train.epochs=2", "train.name=child", f"train.runs_dir={tmp_path}",
                                          f"init_from={source.run_dir}"]), log=quiet)
    child.fit(stop_after_epochs=1)
    after_one_epoch = {k: v.clone() for k, v in child.learner.weights().items()}
    shutil.rmtree(source.run_dir)  # the x2 run was moved or deleted; the x4 run must still resume
    resumed = Trainer.resume(child.run_dir, log=quiet)
    assert resumed.start_epoch == 2
    for name, value in resumed.learner.weights().items():
        assert torch.equal(value, after_one_epoch[name]), name
    assert resumed.cfg["init_from"] == str(source.run_dir)  # the provenance stays in the config
    assert resumed.fit()["epochs"] == 2


def test_build_learner_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = fba.build_learner(model="resnet8", K=4)
    assert torch.equal(torch.rand(3), expected)
    second = fba.build_learner(model="resnet8", K=4)  # and the initial weights still follow the config's seed
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_must_fit_blames_the_config_only_for_a_mismatch(tmp_path):
    from fba.errors import FBAError
    from fba.training.checkpoint import checkpoint_must_fit

    with pytest.raises(FBAError, match="does not fit this config"):
        with checkpoint_must_fit(tmp_path):
            torch.nn.Linear(2, 3).load_state_dict(torch.nn.Linear(2, 4).state_dict())
    with pytest.raises(torch.OutOfMemoryError):
        with checkpoint_must_fit(tmp_path):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="device-side assert"):
        with checkpoint_must_fit(tmp_path):
            raise RuntimeError("CUDA error: device-side assert triggered")


def test_declared_package_data_exists():
    import glob
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in setuptools.get("package-data", {}).items():
        folder = root / "src" / package.replace(".", "/")
        for pattern in patterns:
            assert glob.glob(str(folder / pattern), recursive=True), f"package-data {package}: {pattern} matches nothing"


def test_longterm_bank_gathers_the_batch_rows_once_per_step():
    learner = fba.build_learner(model="resnet8", K=4, num_samples=32)
    bank = learner.bank
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    learner.train_step(x, y, torch.arange(8))  # fills rows 0-7
    reads = []
    read = bank.read
    bank.read = lambda k, device: reads.append(read(k, device)) or reads[-1]
    learner.train_step(x, y, torch.arange(8))
    assert len(reads) == learner.K - 1
    assert all(r[0] is reads[0][0] and r[1] is reads[0][1] for r in reads), "one gather for the K-1 reads"
    assert bool(reads[0][1].all())


def _imagenet_folder(root):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for label, cls in enumerate(("n01", "n02", "n03")):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = np.full((40, 50, 3), 60 * label + 20 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.JPEG")


def test_export_and_eval_after_the_data_folder_is_gone(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from fba.cli import _learner_from_run, main

    data = tmp_path / "imagenet"
    _imagenet_folder(data)
    assert main(["train", "model=resnet8", "K=4", "data.name=imagenet", f"data.root={data}", "data.image_size=32",
                 "data.batch_size=3", "train.epochs=1", "train.progress=false", f"train.runs_dir={tmp_path / 'runs'}",
                 "--json"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_dir"]
    _, trained, _, _ = _learner_from_run(run, [])
    shutil.rmtree(data)

    _, learner, _, info = _learner_from_run(run, [], need_data=False)
    assert learner.bank is None and len(learner.aux_nets) == 0  # inference builds no training-only parts
    assert info.num_classes == 3 and info.in_channels == 3
    assert main(["export", run, "--out", str(tmp_path / "model.safetensors"), "--json"]) == 0
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == trained.plain.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in trained.plain.state_dict().items())

    capsys.readouterr()
    assert main(["eval", run]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fba: error: evaluating needs the test split of 'imagenet'") and len(err.splitlines()) == 1
