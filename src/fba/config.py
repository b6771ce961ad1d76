"""Configuration: defaults, YAML loading, dotted overrides and validation.

A config is a nested dict. Every key has a default, below or in a task plugin's section
(``fba.tasks``); a YAML file or ``key=value`` overrides (``data.batch_size=64``) may change
values but not invent keys. Validation reports the first problem as one line that names
the key and the bad value.
"""

from __future__ import annotations

import copy
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fba import rules
from fba.errors import ConfigError
from fba.rules import Rule
from fba.tasks import DEFAULT_TASK, get_task, list_tasks
from fba.tasks.plugin import TaskPlugin

# Sections every config has whatever its task; the task plugins add theirs between ``train``
# and the method sections (the order a saved config.yaml lists them in).
_CORE_DEFAULTS: dict[str, Any] = {
    "task": DEFAULT_TASK,
    "model": "resnet32",
    "method": "fba",
    "K": 16,
    "partition": "auto",
    "cuts": None,
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
    # Activation checkpointing inside each local module (any method): less memory than both
    # plain local learning and bp_checkpoint, for one recomputed forward (docs/scaling.md).
    # A list of module indices checkpoints only those modules (local methods only).
    "checkpoint": False,
    # Batch chunks of a checkpointed module's per-sample heads (an SR tail) and BatchNorm stems
    # (a detection ResNet's conv1-bn1-relu-maxpool): its backward then holds one chunk's maps at
    # a time (EDSR x4's tail: 0.42x BP instead of 0.63x; docs/scaling.md). 0 runs them whole.
    "checkpoint_chunks": 4,
    "resume": None,
    "init_from": None,
    "distributed": {
        # "ddp": every process a replica (torchrun); "pipeline": each process owns a
        # contiguous group of modules and passes activations on (docs/scaling.md).
        "mode": "ddp",
    },
    "data": {
        "name": "digits",
        "root": "./data",
        "download": False,
        "augment": True,
        "batch_size": 64,
        "eval_batch_size": 256,
        "num_workers": 0,
        "per_class_train": 500,
        "per_class_test": 100,
        "image_size": 224,
    },
    "optim": {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "warmup_epochs": 1.0,
        "decay_every_epochs": 200,
        "decay_factor": 0.5,
        "step": "auto",
        "aux_lr_scale": 1.0,
    },
    "train": {
        "epochs": 30,
        "eval_every": 1,
        "runs_dir": "runs",
        "name": None,
        "progress": True,
        "measure_memory": True,
    },
}

_METHOD_DEFAULTS: dict[str, Any] = {
    # Baselines (paper Table 1); docs/methods.md gives each value's source.
    "predsim": {"beta": 0.99},
    "infopro": {"mode": "contrast", "weights_first": [5.0, 0.05], "weights_last": [0.2, 0.5], "temperature": 0.07},
    "auglocal": {"depth": 2, "tau": 0.5},
    "fba": {
        "preset": None,
        # The classification SLM, chosen by the MNIST ablation (docs/classification.md): the
        # stage-tail block on the module's output pooled by 4, a 2x2 grid head with a 2-layer
        # MLP. Detection and super-resolution build their own SLMs and ignore these four.
        "reduction": 1,
        "block_stride": 1,
        "input_pool": 4,
        "head_grid": 2,
        "head_hidden": 2,
        "share_head": False,
        "bank": {
            # Chosen by the ablation in docs/feature_bank.md (ResNet-32 K=16 on patches).
            "source": "longterm",
            "usage": "target",
            "fusion": "add",
            "target_weight": 1.0,
            "storage": "cpu",
            "dtype": "float16",
        },
    },
}

# A tuple of choices or a callable check (fba.rules). The rule of ``task`` is the registered
# task names, added with the task sections' rules in _schema().
_CORE_RULES: dict[str, Rule] = {
    "model": rules.string,
    "method": rules.string,
    "K": rules.integer,  # the partitioner names the valid range for this backbone
    "partition": ("auto", "count", "stage", "cuts", "balanced"),
    "cuts": rules.cuts,
    "seed": rules.seed,
    "device": rules.device,
    "precision": ("fp32", "bf16", "fp16"),
    "checkpoint": rules.checkpoint_modules,
    "checkpoint_chunks": rules.non_negative_int,
    "distributed.mode": ("ddp", "pipeline"),
    "resume": rules.optional_str,
    "init_from": rules.optional_str,
    "data.name": rules.string,
    "data.root": rules.string,
    "data.download": rules.boolean,
    "data.augment": rules.boolean,
    "data.batch_size": rules.batch,
    "data.eval_batch_size": rules.positive_int,
    "data.num_workers": rules.non_negative_int,
    "data.per_class_train": rules.positive_int,
    "data.per_class_test": rules.positive_int,
    "data.image_size": rules.positive_int,
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.lr": rules.positive_number,
    "optim.momentum": rules.non_negative_number,
    "optim.nesterov": rules.boolean,
    "optim.weight_decay": rules.non_negative_number,
    "optim.schedule": ("cosine", "constant", "step"),
    "optim.warmup_epochs": rules.non_negative_number,
    "optim.decay_every_epochs": rules.positive_number,
    "optim.decay_factor": rules.positive_number,
    "optim.step": ("auto", "global", "per_module"),
    "optim.aux_lr_scale": rules.positive_number,
    "train.epochs": rules.positive_int,
    "train.eval_every": rules.positive_int,
    "train.runs_dir": rules.string,
    "train.name": rules.optional_str,
    "train.progress": rules.boolean,
    "train.measure_memory": rules.boolean,
}

_METHOD_RULES: dict[str, Rule] = {
    "predsim.beta": rules.unit_interval,
    "infopro.mode": ("contrast", "ce"),
    "infopro.weights_first": rules.weight_pair,
    "infopro.weights_last": rules.weight_pair,
    "infopro.temperature": rules.positive_number,
    "auglocal.depth": rules.positive_int,
    "auglocal.tau": rules.unit_interval,
    "fba.preset": (None, "paper"),
    "fba.reduction": rules.positive_int,
    "fba.block_stride": rules.positive_int,
    "fba.head_grid": rules.positive_int,
    "fba.head_hidden": rules.non_negative_int,
    "fba.input_pool": rules.positive_int,
    "fba.share_head": rules.boolean,
    "fba.bank.source": ("none", "inpass", "longterm", "lookahead"),
    "fba.bank.usage": ("input", "target"),
    "fba.bank.fusion": ("add", "concat"),
    "fba.bank.target_weight": rules.non_negative_number,
    "fba.bank.storage": ("cpu", "device"),
    "fba.bank.dtype": ("float16", "float32"),
}


@dataclass(frozen=True)
class _Schema:
    """The config's shape for the tasks registered now: defaults, rules, task defaults."""

    defaults: dict[str, Any]
    rules: dict[str, Rule]
    task_defaults: dict[str, dict[str, Any]]
    sections: frozenset[str]


def _schema() -> _Schema:
    # Rebuilt when the set of registered tasks changes (a plugin registered at run time, as a
    # test does), otherwise cached: validation asks for it once per key.
    return _schema_for(tuple((name, get_task(name)) for name in list_tasks()))


@functools.lru_cache(maxsize=8)
def _schema_for(plugins: tuple[tuple[str, TaskPlugin], ...]) -> _Schema:
    defaults = dict(_CORE_DEFAULTS)
    rule_table: dict[str, Rule] = {"task": tuple(name for name, _ in plugins), **_CORE_RULES}
    for name, plugin in plugins:
        section = plugin.config_section
        if section is None:
            continue
        if section in defaults or section in _METHOD_DEFAULTS:
            raise ValueError(f"task {name!r}: config section {section!r} is taken")
        defaults[section] = dict(plugin.config_defaults)
        missing = set(plugin.config_defaults) ^ set(plugin.config_rules)
        if missing:
            raise ValueError(f"task {name!r}: section {section!r} keys without both a default and a rule: {sorted(missing)}")
        rule_table.update({f"{section}.{key}": rule for key, rule in plugin.config_rules.items()})
    defaults.update(_METHOD_DEFAULTS)
    rule_table.update(_METHOD_RULES)
    return _Schema(defaults=defaults, rules=rule_table, sections=frozenset(_sections(defaults)),
                   task_defaults={name: copy.deepcopy(dict(plugin.task_defaults)) for name, plugin in plugins})


def __getattr__(name: str) -> Any:
    # DEFAULTS, RULES and TASK_DEFAULTS depend on the registered tasks, so they are computed
    # on access rather than frozen at import.
    schema = _schema()
    if name == "DEFAULTS":
        return copy.deepcopy(schema.defaults)
    if name == "RULES":
        return dict(schema.rules)
    if name == "TASK_DEFAULTS":
        return copy.deepcopy(schema.task_defaults)
    raise AttributeError(f"module 'fba.config' has no attribute {name!r}")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and name in _schema().sections:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _sections(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    names = set()
    for key, value in tree.items():
        if isinstance(value, Mapping):
            names.add(prefix + key)
            names |= _sections(value, prefix + key + ".")
    return names


def default_config() -> dict[str, Any]:
    """Every key at its default, with every registered task's section (a fresh copy)."""
    return copy.deepcopy(_schema().defaults)


def _unknown_key(key: str) -> ConfigError:
    schema = _schema()
    known = list(flatten(schema.defaults)) + sorted(schema.sections)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, refusing keys that have no default."""
    parts = key.split(".")
    node, ref = config, _schema().defaults
    for part in parts[:-1]:
        if not isinstance(ref, Mapping) or part not in ref or not isinstance(ref[part], Mapping):
            raise _unknown_key(key)
        node, ref = node.setdefault(part, {}), ref[part]
    if not isinstance(ref, Mapping) or parts[-1] not in ref:
        raise _unknown_key(key)
    if isinstance(ref[parts[-1]], Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} is a section; set its keys, e.g. {key}.{next(iter(ref[parts[-1]]))}=...")
        for sub, sub_value in value.items():
            set_dotted(config, f"{key}.{sub}", sub_value)
        return
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.batch_size=64"`` -> ``("data.batch_size", 64)``; values are parsed as YAML scalars."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _coerce(key: str, value: Any) -> Any:
    # YAML reads "1e-4" as a string; accept it wherever a number is expected.
    default = flatten(_schema().defaults).get(key)
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            number = float(value)
            return int(number) if isinstance(default, int) and number.is_integer() and "." not in value and "e" not in value.lower() else number
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, float):
        return float(value)
    return value


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check every value against its rule; returns the config with numbers coerced."""
    rule_table = _schema().rules
    for key, value in flatten(config).items():
        if key not in rule_table:
            raise _unknown_key(key)
        value = _coerce(key, value)
        set_dotted(config, key, value)
        rule = rule_table[key]
        if isinstance(rule, tuple):
            if value not in rule:
                close = difflib.get_close_matches(str(value), [str(r) for r in rule], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, rule))}{hint}")
        else:
            expected = rule(value)
            if expected:
                raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")
    return config


def task_default_config(task: str) -> dict[str, Any]:
    """Every key at its default for ``task``: the defaults, then the task's own (a fresh copy)."""
    config = default_config()
    for key, value in flatten(_schema().task_defaults.get(task, {})).items():
        set_dotted(config, key, value)
    return config


def resolve_config(source: str | Path | Mapping[str, Any] | None = None, overrides: list[str] | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults <- the task's defaults <- YAML file or dict <- overrides, validated."""
    if isinstance(source, (str, Path)):
        source = load_yaml(source)
    source_items = list(flatten(source or {}).items())
    override_items = list(overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides or []))
    task = next((value for key, value in reversed(source_items + override_items) if key == "task"),
                _schema().defaults["task"])
    config = task_default_config(task)
    for key, value in source_items + override_items:
        set_dotted(config, key, value)
    return validate(config)


def dump_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(config), sort_keys=False)
