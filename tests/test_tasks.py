"""Tasks are plugins: the TASKS registry, what each plugin provides, and a new task that plugs
in without touching build, cli, config or the methods."""

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import fba
from fba.cli import main
from fba.config import resolve_config
from fba.engine.units import UnitModel, UnitSpec
from fba.errors import ConfigError
from fba.methods import list_methods
from fba.registry import Registry
from fba.rules import positive_int
from fba.tasks import TASKS, get_task, list_tasks
from fba.tasks.plugin import TaskPlugin

SRC = Path(fba.__file__).parent
BUILTIN = ("classification", "super_resolution", "detection")
#: a model of each task small enough to train a step in a test, and an input size for it
TINY = {"classification": ("resnet8", 16), "super_resolution": ("edsr_tiny", 8), "detection": ("retinanet_resnet18", 64)}
#: what a plugin must implement itself (the base class only raises NotImplementedError)
REQUIRED = ("model_registry", "dataset_registry", "build_task", "build_model", "build_datasets", "synthetic_batch",
            "describe_metrics", "export_metadata", "evaluate_run")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- the registry and the built-in plugins ----------------------------------------------------
def test_tasks_registry_lists_the_builtin_tasks():
    assert set(BUILTIN) <= set(list_tasks()) == set(TASKS.names())
    assert fba.list_tasks() == list_tasks()
    with pytest.raises(ConfigError, match="unknown task 'detektion'.*classification"):
        get_task("detektion")


@pytest.mark.parametrize("name", BUILTIN)
def test_each_builtin_plugin_provides_every_part(name):
    plugin = get_task(name)
    assert isinstance(plugin, TaskPlugin) and plugin.name == name
    assert plugin.description and plugin.primary_metric and plugin.metric_label
    for member in REQUIRED:
        assert getattr(type(plugin), member) is not getattr(TaskPlugin, member), f"{name} lacks {member}"
    for registry in (plugin.model_registry(), plugin.dataset_registry()):
        assert isinstance(registry, Registry) and registry.names()
    if plugin.config_section is not None:
        assert set(plugin.config_defaults) == set(plugin.config_rules) and plugin.config_defaults
    # The task's defaults alone make a valid config, and every config holds the task's section.
    cfg = resolve_config(None, [f"task={name}"])
    assert plugin.config_section is None or cfg[plugin.config_section].keys() == plugin.config_defaults.keys()
    assert cfg["model"] in plugin.model_registry() and cfg["data"]["name"] in plugin.dataset_registry()
    assert plugin.build_task(cfg).name == name
    # Every part offered to a method resolves, and names a method that exists.
    for method, parts in plugin.offers.items():
        assert method in list_methods()
        for part in parts:
            assert callable(plugin.method_part(method, part)), (method, part)


@pytest.mark.parametrize("name", BUILTIN)
def test_each_builtin_plugin_builds_and_trains_on_its_synthetic_batch(name):
    plugin = get_task(name)
    model, size = TINY[name]
    cfg = resolve_config(None, [f"task={name}", f"model={model}", "K=3", "device=cpu"])
    generator = torch.Generator().manual_seed(0)
    inputs, targets = plugin.synthetic_batch(cfg, 4, 3, size, 5, generator, torch.device("cpu"))
    assert inputs.shape == (4, 3, size, size)
    for method in ("bp", "fba", "dgl"):
        learner = fba.build_learner(cfg, method=method, num_classes=5, num_samples=4)
        out = learner.train_step(inputs, targets, torch.arange(4))
        assert torch.isfinite(torch.tensor(out["loss"]))
    assert plugin.build_model(cfg, 5, 3).specs
    meta = plugin.export_metadata(cfg, _Info(num_classes=5, in_channels=3, num_train=4))
    assert meta and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


def test_describe_metrics_and_primary_metric_come_from_the_task():
    from fba.training.trainer import describe_metrics

    assert describe_metrics({"task": "classification", "top1": 0.5}) == "test top-1 0.5000"
    sr = {"psnr": 30.0, "psnr_bicubic": 28.0, "ssim": 0.9}
    assert describe_metrics(sr, "super_resolution").startswith("PSNR 30.00 dB (bicubic 28.00)")
    assert [get_task(t).primary_metric for t in BUILTIN] == ["top1", "psnr", "map50"]


# ---- the core names no task -------------------------------------------------------------------
def _core_files() -> list[Path]:
    files = [SRC / "build.py", SRC / "cli.py", SRC / "config.py", SRC / "__init__.py", *sorted((SRC / "methods").glob("*.py")),
             *sorted((SRC / "bench").glob("*.py")), *sorted((SRC / "training").glob("*.py")), *sorted((SRC / "engine").glob("*.py"))]
    assert len(files) > 10
    return files


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_core_code_names_no_task(path):
    """No branch on a task name, no import of a task's package: only docstrings and comments
    may mention a task, as an example."""
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            modules = names
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(alias.name for alias in node.names)]
            modules = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names, modules = [node.value], []
        elif isinstance(node, ast.Name):
            names, modules = [node.id], []
        elif isinstance(node, ast.Attribute):
            names, modules = [node.attr], []
        else:
            continue
        found += [f"line {node.lineno}: {text!r}" for text in names for task in BUILTIN if task in text]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            # fba.tasks (the registry) and its plugin interface are task-agnostic; a task's own
            # package is not.
            found += [f"line {node.lineno}: imports {module!r}" for module in modules
                      if module.startswith("fba.tasks.") and module != "fba.tasks.plugin"]
    assert not found, f"{path.name} names a task: {found}"


def test_importing_fba_and_resolving_a_config_stay_light():
    code = ("import sys, fba; from fba.config import resolve_config; import fba.cli; "
            "resolve_config(None, ['task=super_resolution']); "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- a new task plugs in ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Info:
    num_classes: int
    in_channels: int
    num_train: int


def _block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU())


class _MeanHead(nn.Module):
    """``(N, C, H, W) -> (N,)``: the predicted mean brightness of each image."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean(dim=(2, 3)))[:, 0]


def _tinynet(in_channels: int = 3, width: int = 8) -> UnitModel:
    """Three conv units (stem, then a stride-2 stage of two) and a regression head."""
    units = [_block(in_channels, width), _block(width, width, 2), _block(width, width)]
    head = _MeanHead(width)
    plain = nn.Sequential(*units, head)
    specs = [UnitSpec("0", width, 1, 0), UnitSpec("1", width, 2, 1), UnitSpec("2", width, 2, 1)]
    return UnitModel(plain=plain, units=units, specs=specs, head=head,
                     make_stage_block=lambda stage, cin, cout, stride=1: _block(cin, cout, stride),
                     make_head=_MeanHead)


class _Brightness(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.images[index].mean(), index


class _RegressionTask:
    name = "regression"
    variable_size_eval = False

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.float(), targets.float())

    def summarize(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=(2, 3))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches, device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        errors = [F.mse_loss(model(x.to(device)), y.to(device)).item() for x, y, _ in batches]
        model.train(was_training)
        return {"mse": sum(errors) / len(errors), "loss": sum(errors) / len(errors)}


class _DGLRegressionAux(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = _MeanHead(channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)


class RegressionPlugin(TaskPlugin):
    """Predict an image's mean brightness: everything a task provides, in a test file."""

    name = "regression"
    description = "mean brightness regression (a test task)"
    config_section = "regression"
    config_defaults = {"width": 8}
    config_rules = {"width": positive_int}
    task_defaults = {"model": "tinynet", "K": 3, "data": {"name": "brightness", "batch_size": 8, "eval_batch_size": 8},
                     "train": {"epochs": 1, "progress": False}}
    primary_metric = "mse"
    metric_label = "validation MSE"
    offers = {"dgl": {"aux": lambda ctx, k: _DGLRegressionAux(ctx.last_spec(k).out_channels)}}

    def __init__(self) -> None:
        self.models: Registry = Registry("model")
        self.models.register("tinynet")(_tinynet)
        self.datasets: Registry = Registry("dataset")
        self.datasets.register("brightness")(
            lambda: (_Brightness(32, 0), _Brightness(16, 1), _Info(num_classes=1, in_channels=3, num_train=32)))

    def model_registry(self) -> Registry:
        return self.models

    def dataset_registry(self) -> Registry:
        return self.datasets

    def build_task(self, config: Mapping[str, Any]) -> _RegressionTask:
        return _RegressionTask()

    def build_model(self, config: Mapping[str, Any], num_classes: int, in_channels: int) -> UnitModel:
        return self.models.get(config["model"])(in_channels=in_channels, width=config["regression"]["width"])

    def build_datasets(self, config: Mapping[str, Any]):
        return self.datasets.get(config["data"]["name"])()

    def synthetic_batch(self, config, batch_size, in_channels, input_size, num_classes, generator, device):
        images = torch.rand(batch_size, in_channels, input_size, input_size, generator=generator)
        return images.to(device), images.mean(dim=(1, 2, 3)).to(device)

    def describe_metrics(self, metrics: Mapping[str, Any]) -> str:
        return f"MSE {metrics['mse']:.5f}"

    def export_metadata(self, config: Mapping[str, Any], info: Any) -> dict[str, str]:
        return {"width": str(config["regression"]["width"])}

    def evaluate_run(self, config, learner, eval_set, device, *, run_dir, images, out, info=None):
        from torch.utils.data import DataLoader

        if images or out:
            raise ConfigError("--images and --out do not apply to regression runs")
        metrics = learner.task.evaluate(learner, DataLoader(eval_set, batch_size=8), device)
        return {"dataset": config["data"]["name"], **metrics}, self.describe_metrics(metrics)


@pytest.fixture
def regression_task(monkeypatch):
    list_tasks()  # the built-in tasks register first, as they would in a real session
    monkeypatch.setitem(TASKS._entries, "regression", RegressionPlugin())
    yield get_task("regression")


def test_a_new_task_is_listed_and_configured(regression_task, capsys):
    assert "regression" in list_tasks() and fba.list_models("regression") == ["tinynet"]
    assert fba.list_datasets("regression") == ["brightness"]
    cfg = resolve_config(None, ["task=regression"])
    assert (cfg["model"], cfg["K"], cfg["regression"]["width"]) == ("tinynet", 3, 8)
    assert resolve_config(None, ["task=regression", "regression.width=4"])["regression"]["width"] == 4
    assert resolve_config()["regression"] == {"width": 8}  # every config holds every task's section
    with pytest.raises(ConfigError, match="'regression.width': expected a positive integer, got 0"):
        resolve_config(None, ["task=regression", "regression.width=0"])
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "models (regression): tinynet" in out and "datasets (regression): brightness" in out


@pytest.mark.parametrize("method", ["bp", "fba", "dgl", "bp_checkpoint"])
def test_a_new_task_builds_and_trains_with_each_method(regression_task, method):
    learner = fba.build_learner(task="regression", method=method, num_samples=8, device="cpu")
    assert learner.K == (1 if method.startswith("bp") else 3)
    images = torch.rand(8, 3, 8, 8)
    for _ in range(2):
        out = learner.train_step(images, images.mean(dim=(1, 2, 3)), torch.arange(8))
        assert torch.isfinite(torch.tensor(out["loss"]))
    if method == "dgl":
        assert all(isinstance(aux, _DGLRegressionAux) for aux in learner.aux_nets)
    assert learner.export()(images).shape == (8,)


def test_a_new_task_runs_through_the_cli(regression_task, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "task=regression", "method=dgl", f"train.runs_dir={tmp_path / 'runs'}",
                           "train.measure_memory=false", "--json")
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["task"] == "regression" and summary["mse"] >= 0
    run = summary["run_dir"]
    code, out, _ = run_cli(capsys, "eval", run, "--json")
    assert code == 0 and json.loads(out)["mse"] == pytest.approx(summary["mse"])
    code, _, err = run_cli(capsys, "eval", run, "--images", str(tmp_path))
    assert code == 2 and "do not apply to regression" in err
    code, out, _ = run_cli(capsys, "export", run, "--out", str(tmp_path / "m.safetensors"), "--json")
    assert code == 0 and json.loads(out)["width"] == "8"
    code, out, _ = run_cli(capsys, "bench", "memory", "task=regression", "--methods", "bp,dgl", "--batch-size", "4",
                           "--input-size", "8", "--num-samples", "8", "--out", str(tmp_path / "bench"), "--json", "--quiet")
    rows = json.loads(out)["rows"]
    assert code == 0 and [r["method"] for r in rows] == ["bp", "dgl"]


def test_a_removed_task_leaves_no_trace():
    # Runs after the tests above: the registry and the config schema forget the test task.
    assert "regression" not in list_tasks()
    with pytest.raises(ConfigError, match="'task': 'regression' is not one of"):
        resolve_config(None, ["task=regression"])
    assert "regression" not in resolve_config()
