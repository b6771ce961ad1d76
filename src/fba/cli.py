"""The ``fba`` command line: train, eval, bench, compare, export, list.

User errors (bad config, unknown names, missing data, a diverging loss) print one line
``fba: error: ...`` on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            from fba.errors import ConfigError

            raise ConfigError(f"unexpected argument {item!r}: give at most one CONFIG.yaml, then key=value overrides")
    return config, overrides


def _methods_arg(text: str) -> list[str]:
    """``--methods bp,fba`` -> ``["bp", "fba"]``; at least one name. Commas inside brackets
    belong to a row's value: ``bp,fba+checkpoint=[0,1]`` is two rows."""
    from fba.errors import ConfigError

    methods, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if depth < 0:
            break
        if char == "," and depth == 0:
            methods.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ConfigError(f"--methods {text!r}: unbalanced brackets")
    methods = [m for m in methods if m]
    if not methods:
        raise ConfigError("--methods: give at least one method, e.g. --methods bp,fba")
    return methods


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _report(args: argparse.Namespace, result: Any, text: str) -> int:
    """``--json``: the result as one JSON line; otherwise a human sentence."""
    _print_json(result) if args.json else print(text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fba.config import resolve_config
    from fba.training.trainer import Trainer

    config_path, overrides = _split_config_and_overrides(args.items)
    cfg = resolve_config(config_path, overrides)
    if cfg["resume"] and config_path:
        from fba.errors import ConfigError

        raise ConfigError(f"resume={cfg['resume']} continues with that run's own config.yaml; "
                          f"drop {config_path!r} (key=value overrides are still applied)")
    if cfg["resume"]:
        resume_overrides = [o for o in overrides if not o.startswith("resume=")]
        trainer = Trainer.resume(cfg["resume"], resume_overrides)
    else:
        trainer = Trainer(cfg)
    from fba.distributed import teardown

    try:
        summary = trainer.fit()
    finally:
        teardown(trainer.dist, trainer.learner)
    if not trainer.dist.is_main:
        return 0
    from fba.training.trainer import describe_metrics

    return _report(args, summary, f"done: {describe_metrics(summary)}, {summary['seconds_per_epoch']:.1f} s/epoch, "
                                  f"run folder {summary['run_dir']}")


def _run_dir_and_weights(path: str) -> tuple[Path, Path]:
    from fba.errors import FBAError
    from fba.training.checkpoint import WEIGHTS

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        if not (p.parent.parent / "config.yaml").is_file():
            raise FBAError(f"{path!r} is not a training checkpoint (exported models and files outside a run "
                           "folder have no config); give a run folder or its checkpoints/last.safetensors")
        return p.parent.parent, p
    if (p / "checkpoints" / WEIGHTS).is_file():
        return p, p / "checkpoints" / WEIGHTS
    raise FBAError(f"{path!r} is neither a run folder with a checkpoint nor a .safetensors checkpoint")


def _learner_from_run(path: str, overrides: list[str], need_data: bool = True):
    """A run's trained network for inference, its config, and (when ``need_data``) its test split.

    The network is built from the data facts saved with the checkpoint, so exporting needs
    no dataset; runs saved before those facts existed read them from the dataset.
    """
    from types import SimpleNamespace

    from fba.build import build_datasets, build_inference_learner
    from fba.config import load_yaml, resolve_config
    from fba.errors import DataError
    from fba.tasks import get_task
    from fba.training.checkpoint import checkpoint_must_fit, load_weights_and_data_facts

    run_dir, weights_path = _run_dir_and_weights(path)
    cfg = resolve_config(load_yaml(run_dir / "config.yaml"), overrides)
    weights, facts = load_weights_and_data_facts(weights_path)
    info = SimpleNamespace(**facts) if facts else None
    test_set = None
    if need_data:
        try:
            _, test_set, data_info = build_datasets(cfg)
        except DataError as error:
            raise DataError(f"evaluating needs the test split of {cfg['data']['name']!r} (give data.root=... if "
                            f"it moved): {error}") from None
        info = info or data_info
    elif info is None:
        # Running the model on a folder of images needs no dataset, where the task can tell the
        # data's shape facts from the config alone.
        info = get_task(cfg["task"]).offline_data_info(cfg) or build_datasets(cfg)[2]
    learner = build_inference_learner(cfg, num_classes=getattr(info, "num_classes", None), in_channels=info.in_channels)
    with checkpoint_must_fit(weights_path):
        learner.load_model_weights(weights)
    return cfg, learner, test_set, info


def cmd_eval(args: argparse.Namespace) -> int:
    from fba.build import resolve_device
    from fba.tasks import get_task

    cfg, learner, test_set, info = _learner_from_run(args.run, args.overrides, need_data=args.images is None)
    device = resolve_device(cfg["device"])
    run_dir = _run_dir_and_weights(args.run)[0]
    result, text = get_task(cfg["task"]).evaluate_run(cfg, learner, test_set, device, run_dir=run_dir,
                                                      images=args.images, out=args.out, info=info)
    return _report(args, {"run": args.run, **result}, text)


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from fba.tasks import get_task

    cfg, learner, _, info = _learner_from_run(args.run, [], need_data=False)
    model = learner.export()
    out = Path(args.out) if args.out else _run_dir_and_weights(args.run)[0] / "export" / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    shape = get_task(cfg["task"]).export_metadata(cfg, info)
    meta = {"task": cfg["task"], "model": cfg["model"], **shape, "in_channels": str(info.in_channels),
            "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    save_file(state, str(out), metadata=meta)
    result = {"path": str(out), "params": sum(v.numel() for v in model.parameters()), **meta}
    return _report(args, result, f"exported {meta['class']} ({result['params']:,} parameters) to {out}")


def cmd_bench(args: argparse.Namespace) -> int:
    from fba.bench import report, runner
    from fba.config import resolve_config

    config_path, overrides = _split_config_and_overrides(args.items)
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "data.image_size"]
    if config_path is not None and not given:
        from fba.config import load_yaml

        data = load_yaml(config_path).get("data")
        if isinstance(data, dict) and "image_size" in data:
            given = [str(data["image_size"])]
    if given and given[-1] != str(args.input_size):
        from fba.errors import ConfigError

        raise ConfigError(f"data.image_size={given[-1]} and --input-size {args.input_size} disagree; give one of them")
    # Models built for an image size (detection's transform and anchors) must see the measured
    # shape, not resize it to the config's size. The batch follows --batch-size without a
    # check, since a training config's batch is no claim about the measurement; partition=
    # balanced must see it, as it weighs activations (which grow with it) against weights.
    cfg = resolve_config(config_path, [*overrides, f"data.image_size={args.input_size}",
                                       f"data.batch_size={args.batch_size}"])
    methods = _methods_arg(args.methods)
    from fba.build import build_model
    from fba.engine.partition import check_partition
    from fba.methods import get_method

    names = [runner.parse_method_spec(m)[0] for m in methods]  # options are checked here too
    if any(not get_method(m).end_to_end for m in names):  # fail before measuring anything
        check_partition(build_model(cfg, args.num_classes, args.in_channels).specs, cfg["K"],
                        cfg["partition"], cfg["cuts"])
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.quiet else (lambda msg: None)
    common = dict(batch_size=args.batch_size, input_size=args.input_size, in_channels=args.in_channels,
                  num_classes=args.num_classes, num_samples=args.num_samples, progress=log)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or Path(cfg["train"]["runs_dir"]) / "bench" / f"{stamp}-{args.what}-{cfg['model']}")
    title = f"{cfg['model']}, batch {args.batch_size}, {args.input_size}x{args.input_size}"
    if args.what == "memory":
        rows = runner.measure_memory(cfg, methods, steps=args.steps, **common)
        columns = ["method", "K", "peak_bytes", "params", "grads", "optimizer", "bank", "activations", "peak_module",
                   "memory_ratio_to_bp"]
        chart = report.memory_chart(rows, out_dir / "memory.png", f"peak training memory: {title} ({rows[0]['backend']})")
    else:
        rows = runner.measure_time(cfg, methods, warmup=args.warmup, steps=args.steps, **common)
        columns = ["method", "K", "seconds_per_step", "iqr_seconds", "time_ratio_to_bp"]
        chart = report.time_chart(rows, out_dir / "time.png", f"step time: {title}")
    files = report.write_tables(rows, columns, out_dir, args.what) + [chart]
    if args.json:
        _print_json({"rows": rows, "files": [str(f) for f in files]})
    else:
        print(report.text_table(rows, columns))
        print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fba.bench.compare import compare_methods, metric_table, write_report
    from fba.bench.report import text_table
    from fba.config import resolve_config
    from fba.errors import ConfigError
    from fba.methods import get_method

    config_path, overrides = _split_config_and_overrides(args.items)
    methods = _methods_arg(args.methods)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {args.methods}")
    for method in methods:  # fail on a typo before hours of training, not after
        get_method(method)
    cfg = resolve_config(config_path, overrides)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or Path(cfg["train"]["runs_dir"]) / "compare" / f"{stamp}-{cfg['data']['name']}-{cfg['model']}")
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.quiet else (lambda msg: None)
    run_overrides = [*overrides, f"train.runs_dir={out_dir / 'runs'}", "train.name=null"]
    rows = compare_methods(config_path, methods, run_overrides, log=log)
    title = (f"{cfg['model']} K={cfg['K']} on {cfg['data']['name']}: {cfg['train']['epochs']} epochs, "
             f"batch {cfg['data']['batch_size']}, seed {cfg['seed']}")
    files = write_report(rows, out_dir, title)
    if args.json:
        _print_json({"rows": rows, "files": [str(f) for f in files]})
    else:
        print(text_table(*metric_table(rows)))
        print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import fba

    tasks = fba.list_tasks()
    listing = {
        "models": {task: fba.list_models(task) for task in tasks},
        "methods": {"": fba.list_methods()},
        "datasets": {task: fba.list_datasets(task) for task in tasks},
    }
    for kind, groups in listing.items():
        if args.what in (None, kind):
            for group, names in groups.items():
                print(f"{kind}{f' ({group})' if group else ''}: {', '.join(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fba", description="Supervised local learning with Feature Bank Augmented auxiliary networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,bench,compare,export,list}")

    p = sub.add_parser("train", help="train a model (no argument: FBA, ResNet-32, K=16 on the built-in digits)",
                       description="Train. ITEMS: an optional CONFIG.yaml, then key=value overrides with dotted keys "
                                   "(e.g. data.batch_size=64 method=bp K=4). resume=RUN_DIR continues a run.")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    p.set_defaults(func=cmd_train)

    # --images and --out mean what the run's task makes of them (its plugin's evaluate_run).
    p = sub.add_parser("eval", help="evaluate a run's last checkpoint on its test split (or run it on a folder of images)")
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT.safetensors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=... device=cpu")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="run the model on every image in FOLDER and write its outputs as PNGs, no metrics "
                        "(tasks with image outputs, e.g. super-resolution)")
    p.add_argument("--out", default=None, metavar="FOLDER",
                   help="where to write PNGs (default with --images: a folder in RUN_DIR named after FOLDER; "
                        "without --images, also writes the evaluation images' outputs)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measure peak training memory or step time of several methods side by side")
    p.add_argument("what", choices=["memory", "time"])
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value", help="model=..., K=..., fba.* options")
    p.add_argument("--methods", default="bp,bp_checkpoint,fba",
                   help="comma-separated methods; METHOD+checkpoint adds checkpoint=true to that row, METHOD+KEY=VALUE sets one key for that row (fba+checkpoint=[0]), METHOD+ddp and "
                        "METHOD+pipeline run it in 2 processes (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    p.add_argument("--input-size", type=int, default=32, help="square input side in pixels (default: %(default)s)")
    p.add_argument("--in-channels", type=int, default=3, help="default: %(default)s")
    p.add_argument("--num-classes", type=int, default=10, help="default: %(default)s")
    p.add_argument("--num-samples", type=int, default=50_000, help="dataset size for the long-term bank (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 2 for memory, 10 for time)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps before timing (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: RUNS_DIR/bench/<time>-<what>-<model>)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="train several methods with one budget and tabulate accuracy, time and memory",
                       description="Train each method with the same config (dataset, model, K, epochs, batch, seed) "
                                   "and write one row per method: accuracy, seconds per epoch, peak training memory "
                                   "and the ratios to bp (paper Table 1). ITEMS: an optional CONFIG.yaml, then "
                                   "key=value overrides.")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value")
    p.add_argument("--methods", default="bp,bp_checkpoint,fba,dgl,predsim,infopro,auglocal",
                   help="comma-separated methods (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: RUNS_DIR/compare/<time>-<data>-<model>)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="write the plain inference model (backbone + head) as safetensors")
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT.safetensors")
    p.add_argument("--out", default=None, help="output file (default: RUN_DIR/export/model.safetensors)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("list", help="list models, methods and datasets")
    p.add_argument("what", nargs="?", choices=["models", "methods", "datasets"])
    p.set_defaults(func=cmd_list)
    return parser


def _check_bench_args(args: argparse.Namespace) -> None:
    from fba.errors import ConfigError

    if args.command != "bench":
        return
    if args.steps is None:
        args.steps = 2 if args.what == "memory" else 10
    for name in ("batch_size", "input_size", "in_channels", "num_classes", "num_samples", "steps"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ConfigError("--batch-size must be at least 2 (train-mode BatchNorm needs two samples)")
    if args.num_samples < args.batch_size:
        raise ConfigError(f"--num-samples ({args.num_samples}) must be at least --batch-size ({args.batch_size})")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    # One line a user can read ("fba: warning: ..."), not the source line that raised it.
    print(f"fba: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the caller's handler (tests call main in-process)
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from fba.errors import FBAError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Options may come before key=value overrides; argparse leaves such late overrides over.
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(late) != len(extra) or (late and not hasattr(args, "items") and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in late) or ' '.join(late)}")
    if late:
        (args.items if hasattr(args, "items") else args.overrides).extend(late)
    try:
        _check_bench_args(args)
        return args.func(args)
    except FBAError as error:
        print(f"fba: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fba: interrupted; a run continues from its last checkpoint with: fba train resume=RUN_DIR", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
