"""Configuration: defaults, YAML loading, dotted overrides and validation.

A config is a nested dict. Every key has a default below; a YAML file or ``key=value``
overrides (``data.batch_size=64``) may change values but not invent keys. Validation
reports the first problem as one line that names the key and the bad value.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any, Mapping

from fba.errors import ConfigError

# Rules: a type, a tuple of choices, or a callable check. None in DEFAULTS means "optional".
DEFAULTS: dict[str, Any] = {
    "task": "classification",
    "model": "resnet32",
    "method": "fba",
    "K": 16,
    "partition": "auto",
    "cuts": None,
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
    "resume": None,
    "init_from": None,
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
    },
    "train": {
        "epochs": 30,
        "eval_every": 1,
        "runs_dir": "runs",
        "name": None,
        "progress": True,
        "measure_memory": True,
    },
    "sr": {
        "scale": 2,
        "patch_size": 48,
        "patches_per_epoch": 1600,
        "eval_crop": None,
        "y_channel": True,
    },
    # Baselines (paper Table 1); docs/methods.md gives each value's source.
    "predsim": {"beta": 0.99},
    "infopro": {"mode": "contrast", "weights_first": [5.0, 0.05], "weights_last": [0.2, 0.5], "temperature": 0.07},
    "auglocal": {"depth": 2, "tau": 0.5},
    "fba": {
        "reduction": 1,
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


# What changes when a config names another task: a user who writes only
# ``task=super_resolution`` gets a complete, sensible run (EDSR baseline x2, FBA, photos-sr).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {},
    "super_resolution": {
        "model": "edsr_baseline",
        "K": 6,
        "data": {"name": "photos-sr", "batch_size": 16, "eval_batch_size": 1, "augment": True},
        # EDSR's recipe is Adam at 1e-4, halved every 200 epochs of 1,000 steps; the built-in
        # run is short, so it uses a higher rate with a cosine decay.
        "optim": {"name": "adam", "lr": 5e-4, "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0.0},
        # 30 epochs x 25 steps of 16 32x32 LR patches: about 12 minutes on 2 CPU cores.
        "train": {"epochs": 30},
        "sr": {"patch_size": 32, "patches_per_epoch": 400, "eval_crop": 256},
        # The SR bank is the early full-resolution map of the current batch (paper Fig. 4).
        # Half-width SLM tails: 0.42x BP's memory instead of 0.51x at 48x48, for 0.09 dB
        # (docs/super_resolution.md, ablation).
        "fba": {"reduction": 2, "bank": {"source": "inpass", "usage": "input"}},
    },
}


def _int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"


def _positive_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "a positive integer"


def _non_negative_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "a non-negative integer"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative_number(value: Any) -> str | None:
    return None if _finite(value) and value >= 0 else "a finite non-negative number"


def _positive_number(value: Any) -> str | None:
    return None if _finite(value) and value > 0 else "a finite positive number"


def _seed(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32
    return None if ok else "an integer in [0, 2**32)"


def _batch(value: Any) -> str | None:
    # BatchNorm in train mode needs at least two samples per batch.
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else "an integer >= 2"


def _device(value: Any) -> str | None:
    return None if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) else "auto, cpu, cuda or cuda:N"


def _optional_str(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "a string or null"


def _cuts(value: Any) -> str | None:
    ok = value is None or (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    return None if ok else "a list of integer unit indices or null"


def _weight_pair(value: Any) -> str | None:
    ok = isinstance(value, list) and len(value) == 2 and all(_finite(v) and v >= 0 for v in value)
    return None if ok else "a list of two non-negative numbers [reconstruction, task]"


def _unit_interval(value: Any) -> str | None:
    return None if _finite(value) and 0 <= value <= 1 else "a number in [0, 1]"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _str(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


RULES: dict[str, Any] = {
    "task": tuple(TASK_DEFAULTS),
    "model": _str,
    "method": _str,
    "K": _int,  # the partitioner names the valid range for this backbone
    "partition": ("auto", "count", "stage", "cuts"),
    "cuts": _cuts,
    "seed": _seed,
    "device": _device,
    "precision": ("fp32", "bf16", "fp16"),
    "resume": _optional_str,
    "init_from": _optional_str,
    "data.name": _str,
    "data.root": _str,
    "data.download": _bool,
    "data.augment": _bool,
    "data.batch_size": _batch,
    "data.eval_batch_size": _positive_int,
    "data.num_workers": _non_negative_int,
    "data.per_class_train": _positive_int,
    "data.per_class_test": _positive_int,
    "data.image_size": _positive_int,
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.lr": _positive_number,
    "optim.momentum": _non_negative_number,
    "optim.nesterov": _bool,
    "optim.weight_decay": _non_negative_number,
    "optim.schedule": ("cosine", "constant", "step"),
    "optim.warmup_epochs": _non_negative_number,
    "optim.decay_every_epochs": _positive_number,
    "optim.decay_factor": _positive_number,
    "optim.step": ("auto", "global", "per_module"),
    "train.epochs": _positive_int,
    "train.eval_every": _positive_int,
    "train.runs_dir": _str,
    "train.name": _optional_str,
    "train.progress": _bool,
    "train.measure_memory": _bool,
    "predsim.beta": _unit_interval,
    "infopro.mode": ("contrast", "ce"),
    "infopro.weights_first": _weight_pair,
    "infopro.weights_last": _weight_pair,
    "infopro.temperature": _positive_number,
    "auglocal.depth": _positive_int,
    "auglocal.tau": _unit_interval,
    "sr.scale": (2, 3, 4),
    "sr.patch_size": _positive_int,
    "sr.patches_per_epoch": _positive_int,
    "sr.eval_crop": lambda v: None if v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0) else "a positive integer or null",
    "sr.y_channel": _bool,
    "fba.reduction": _positive_int,
    "fba.share_head": _bool,
    "fba.bank.source": ("none", "inpass", "longterm", "lookahead"),
    "fba.bank.usage": ("input", "target"),
    "fba.bank.fusion": ("add", "concat"),
    "fba.bank.target_weight": _non_negative_number,
    "fba.bank.storage": ("cpu", "device"),
    "fba.bank.dtype": ("float16", "float32"),
}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and name in _SECTIONS:
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


_SECTIONS = _sections(DEFAULTS)


def default_config() -> dict[str, Any]:
    return copy.deepcopy(DEFAULTS)


def _unknown_key(key: str) -> ConfigError:
    known = list(flatten(DEFAULTS)) + sorted(_SECTIONS)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, refusing keys that have no default."""
    parts = key.split(".")
    node, ref = config, DEFAULTS
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
    default = flatten(DEFAULTS).get(key)
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
    for key, value in flatten(config).items():
        if key not in RULES:
            raise _unknown_key(key)
        value = _coerce(key, value)
        set_dotted(config, key, value)
        rule = RULES[key]
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


def resolve_config(source: str | Path | Mapping[str, Any] | None = None, overrides: list[str] | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults <- the task's defaults <- YAML file or dict <- overrides, validated."""
    config = default_config()
    if isinstance(source, (str, Path)):
        source = load_yaml(source)
    source_items = list(flatten(source or {}).items())
    override_items = list(overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides or []))
    task = next((value for key, value in reversed(source_items + override_items) if key == "task"), config["task"])
    for key, value in flatten(TASK_DEFAULTS.get(task, {})).items():
        set_dotted(config, key, value)
    for key, value in source_items + override_items:
        set_dotted(config, key, value)
    return validate(config)


def dump_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(config), sort_keys=False)
