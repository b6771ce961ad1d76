"""The epoch loop: data, local steps, evaluation, run folder, checkpoints, resume."""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from fba.build import build_datasets, build_learner, resolve_device
from fba.config import dump_yaml, load_yaml, resolve_config
from fba.distributed import barrier, device_for, distribute, setup_from_env
from fba.errors import FBAError, NonFiniteLossError
from fba.tasks import get_task
from fba.training.checkpoint import STATE, WEIGHTS, checkpoint_must_fit, load_checkpoint, save_checkpoint
from fba.training.records import RunRecords


def describe_metrics(metrics: Mapping[str, Any], task: str | None = None) -> str:
    """One human phrase for a task's evaluation metrics; ``task`` defaults to ``metrics["task"]``
    (a run summary names its task)."""
    return get_task(task or metrics["task"]).describe_metrics(metrics)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's augmentation (and, for rank 0, shuffling) on one process.

    It depends only on (seed, epoch, rank), so a run resumed at an epoch boundary draws exactly
    the random numbers the uninterrupted run would. The rank is in it so that the processes
    of a distributed run draw different crops, flips and patches for their samples.
    """
    return seed * 100_003 + epoch + rank * 1_000_000_007  # rank 0 keeps the single-process seeds


class Trainer:
    """Trains a learner from a resolved config and keeps a run folder.

    Run folder: ``config.yaml`` (resolved), ``metrics.csv``/``metrics.json`` (one row per
    epoch), ``tensorboard/``, ``checkpoints/last.safetensors`` + ``last_state.pt``,
    ``curves.png``, ``summary.json``.
    """

    def __init__(self, config: Mapping[str, Any], run_dir: Path | None = None, log=None,
                 initialise: bool = True) -> None:
        """``initialise=False`` skips ``init_from``: a resumed run loads every weight from its checkpoint."""
        self.cfg = dict(config)
        self.dist = setup_from_env()
        self.log = (log or (lambda msg: print(msg, file=sys.stderr))) if self.dist.is_main else (lambda msg: None)
        self.device = device_for(self.dist, resolve_device(self.cfg["device"]))
        self.cfg["device"] = str(self.device) if self.dist.enabled else self.cfg["device"]
        self.task_plugin = get_task(self.cfg["task"])
        self.train_set, self.test_set, self.info = build_datasets(self.cfg)
        if self.train_set is None:
            raise FBAError(f"dataset {self.cfg['data']['name']!r} has no training split (it is for evaluation): "
                           "train on another dataset, then run fba eval RUN_DIR data.name=...")
        data = self.cfg["data"]
        self.batch_size = data["batch_size"]
        # In a pipeline every rank trains every batch (on its own modules); with DDP each rank
        # trains its shard, so the global batch is world_size times larger.
        self.pipelined = self.dist.enabled and self.cfg["distributed"]["mode"] == "pipeline"
        global_batch = self.batch_size * (1 if self.pipelined else self.dist.world_size)
        drop_last = len(self.train_set) > global_batch  # a batch of one breaks train-mode BatchNorm
        self.steps_per_epoch = len(self.train_set) // global_batch if drop_last else 1
        self.drop_last = drop_last
        build_cfg = self.cfg if initialise else {**self.cfg, "init_from": None}
        if self.pipelined and build_cfg["optim"]["step"] == "auto":  # stages step their own modules
            build_cfg = {**build_cfg, "optim": {**build_cfg["optim"], "step": "per_module"}}
        self.learner = build_learner(
            build_cfg, num_classes=getattr(self.info, "num_classes", None), in_channels=self.info.in_channels,
            num_samples=self.info.num_train, total_steps=self.steps_per_epoch * self.cfg["train"]["epochs"],
            steps_per_epoch=self.steps_per_epoch, input_size=getattr(self.info, "image_size", None))
        self.stage = None
        if self.pipelined:
            self.stage = self._pipeline_stage()
        elif self.dist.enabled:
            distribute(self.learner, self.dist, self.device)
        self.run_dir = run_dir or self._new_run_dir()
        self.start_epoch = 1
        self.rows: list[dict[str, Any]] = []
        self.peak_memory_bytes: int | None = None

    def _pipeline_stage(self):
        """This rank's pipeline stage, the module groups balanced by each module's measured step."""
        from fba.pipeline import PipelineStage, balanced_groups

        batch = None
        if self.dist.is_main:
            images, targets, indices = next(iter(self.loader(True, 0)))
            batch = (images.to(self.device), self.task_plugin.targets_to(targets, self.device), indices)
        ranges = balanced_groups(self.learner, batch, self.dist.world_size)
        self.log(f"pipeline: modules {', '.join(f'{r.start}-{r.stop - 1}' for r in ranges)} on ranks "
                 f"0-{len(ranges) - 1}")
        self.module_groups = ranges
        return PipelineStage(self.learner, ranges, self.dist.rank, self.device)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, log=None) -> "Trainer":
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FBAError(f"resume: {str(run_dir)!r} is not a run folder (no config.yaml)")
        cfg = resolve_config(load_yaml(run_dir / "config.yaml"), overrides)
        cfg["resume"] = None
        ckpt = run_dir / "checkpoints"
        has_checkpoint = (ckpt / STATE).is_file()
        # The checkpoint holds every weight, so the init_from source (which may have moved
        # since) is read only when the run stopped before its first checkpoint.
        trainer = cls(cfg, run_dir=run_dir, log=log, initialise=not has_checkpoint)
        if has_checkpoint:
            weights, state = load_checkpoint(ckpt)
            with checkpoint_must_fit(ckpt):
                trainer.learner.load_weights(weights)
                trainer.learner.load_training_state(state["learner"])
            trainer.start_epoch = state["epoch"] + 1
            trainer.rows = state["rows"]
            trainer.peak_memory_bytes = state.get("peak_memory_bytes")
            trainer.log(f"resuming {run_dir} after epoch {state['epoch']}")
        return trainer

    def _new_run_dir(self) -> Path:
        name = self.cfg["train"]["name"] or "{}-{}-{}-K{}-{}".format(
            datetime.now().strftime("%Y%m%d-%H%M%S"), self.cfg["data"]["name"], self.cfg["model"],
            self.learner.K, self.cfg["method"])
        run_dir = Path(self.cfg["train"]["runs_dir"]) / name
        suffix, candidate = 1, run_dir
        while candidate.exists():
            suffix += 1
            candidate = run_dir.with_name(f"{run_dir.name}-{suffix}")
        return candidate

    def loader(self, train: bool, epoch: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg["seed"], epoch, self.dist.rank))
        data = self.cfg["data"]
        sampler = None
        if train and self.dist.enabled and not self.pipelined:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=self.cfg["seed"], drop_last=True)
            sampler.set_epoch(epoch)
        return DataLoader(
            self.train_set if train else self.test_set,
            batch_size=self.batch_size if train else (1 if self.learner.task.variable_size_eval else data["eval_batch_size"]),
            shuffle=train and sampler is None, sampler=sampler, drop_last=train and self.drop_last, generator=generator,
            num_workers=data["num_workers"], pin_memory=self.device.type == "cuda", collate_fn=self.task_plugin.collate_fn(),
            persistent_workers=False)

    def fit(self, stop_after_epochs: int | None = None) -> dict[str, Any]:
        """Train to ``train.epochs`` (or only ``stop_after_epochs`` more, to simulate an interruption)."""
        main = self.dist.is_main
        if main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            except OSError as error:
                raise FBAError(f"cannot create the run folder {str(self.run_dir)!r}: {error.strerror or error}") from None
        records = RunRecords(self.run_dir, self.rows, enabled=main)
        epochs = self.cfg["train"]["epochs"]
        last = epochs if stop_after_epochs is None else min(epochs, self.start_epoch + stop_after_epochs - 1)
        self.log(f"run folder: {self.run_dir}")
        backbone = sum(p.numel() for p in self.learner.plain.parameters())
        aux = sum(p.numel() for p in self.learner.aux_nets.parameters())
        self.log(f"{self.cfg['method']} {self.cfg['model']} K={self.learner.K} on {self.cfg['data']['name']}: "
                 f"{backbone:,} backbone+head parameters, {aux:,} auxiliary (training only)")
        if self.cfg["partition"] == "balanced" and self.learner.K > 1:
            groups = self.learner.groups
            self.log(f"partition=balanced: units per module {[len(g) for g in groups]} "
                     f"(partition=cuts cuts={[g[0] for g in groups[1:]]} pins it)")
        try:
            for epoch in range(self.start_epoch, last + 1):
                row = self._train_epoch_pipelined(epoch) if self.pipelined else self._train_epoch(epoch, records)
                if main and (epoch % self.cfg["train"]["eval_every"] == 0 or epoch == epochs):
                    metrics = self.learner.task.evaluate(self.learner, self.loader(False), self.device)
                    row.update({k: v for k, v in metrics.items() if k != "loss"}, test_loss=metrics["loss"])
                    self.log(f"epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f}, {describe_metrics(metrics, self.cfg['task'])}, {row['seconds']:.1f}s")
                records.add_epoch(row)
                if main:
                    self._checkpoint(epoch, records.rows)
                barrier(self.dist)  # replicas wait while the main process evaluates and saves
        except NonFiniteLossError as error:
            kept = self.run_dir / "checkpoints" / WEIGHTS
            where = f"; the last good checkpoint is kept at {kept}" if kept.exists() else ""
            raise NonFiniteLossError(f"{error}{where}") from None
        finally:
            records.close()
        self.rows = records.rows
        summary = self.summary()
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _train_epoch(self, epoch: int, records: RunRecords) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.seed_epoch(epoch)
        cuda_peak = self.device.type == "cuda" and self.cfg["train"]["measure_memory"]
        if cuda_peak:  # training steps only: evaluation must not set the training peak
            torch.cuda.reset_peak_memory_stats(self.device)
        losses: list[float] = []
        module_losses: dict[str, list[float]] = {}  # "loss/k": module k's local loss per step
        lr = self.learner.optimizers[0].param_groups[0]["lr"]
        tracker_seconds = 0.0
        start = time.perf_counter()
        batches = tqdm(self.loader(True, epoch), desc=f"epoch {epoch}", leave=False, unit="batch",
                       disable=not (self.cfg["train"]["progress"] and self.dist.is_main), file=sys.stderr)
        for images, labels, indices in batches:  # (lr, hr, index) for super-resolution
            images = images.to(self.device, non_blocking=True)
            labels = self.task_plugin.targets_to(labels, self.device)
            # Measured on a step that starts with optimizer state, as fba bench does: the first
            # step creates it, so it would miss the momentum (or Adam) buffers.
            if (self.peak_memory_bytes is None and self.cfg["train"]["measure_memory"] and not cuda_peak
                    and self.learner.global_step >= 1):
                tracked = time.perf_counter()
                out = self._measured_step(images, labels, indices)
                # The tracker slows its step by a method-dependent amount: keep it out of the timing.
                tracker_seconds = time.perf_counter() - tracked
            else:
                out = self.learner.train_step(images, labels, indices)
            losses.append(out["loss"])
            module_keys = [key for key in out if key.startswith("loss/")]
            for key in module_keys:
                module_losses.setdefault(key, []).append(out[key])
            lr = out["lr"]
            batches.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
            if self.learner.global_step % 10 == 0:
                records.scalar("step/loss", out["loss"], self.learner.global_step)
                records.scalar("step/lr", out["lr"], self.learner.global_step)
                for key in module_keys:  # where local learning goes wrong shows module by module
                    records.scalar(f"step/{key}", out[key], self.learner.global_step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if cuda_peak:
                self.peak_memory_bytes = max(self.peak_memory_bytes or 0, torch.cuda.max_memory_allocated(self.device))
        seconds = time.perf_counter() - start
        if tracker_seconds and len(losses) > 1:  # the tracked step counts as an average one
            untracked = seconds - tracker_seconds
            seconds = untracked * len(losses) / (len(losses) - 1)
        row = {"epoch": epoch, "train_loss": statistics.fmean(losses) if losses else float("nan"),
               "lr": lr, "seconds": seconds}  # the rate of the epoch's last step, not the next one's
        if len(module_losses) > 1:  # one module: its loss is train_loss
            row.update({f"train_{key}": statistics.fmean(values) for key, values in module_losses.items()})
        return row

    def _train_epoch_pipelined(self, epoch: int) -> dict[str, Any]:
        """One epoch as a pipeline stage: rank 0 reads the batches, every rank trains its modules.

        At the end every rank gives its modules' state to the others, so rank 0 holds the whole
        trained learner to evaluate and save.
        """
        import torch.distributed as dist
        from tqdm.auto import tqdm

        self.seed_epoch(epoch)  # rank 0 draws the augmentations a single process would
        stage = self.stage
        losses: list[float] = []
        lr = self.learner.optimizers[stage.modules.start].param_groups[0]["lr"]
        start = time.perf_counter()
        if self.dist.is_main:
            batches = tqdm(self.loader(True, epoch), desc=f"epoch {epoch}", leave=False, unit="batch",
                           disable=not self.cfg["train"]["progress"], file=sys.stderr)
            for images, labels, indices in batches:
                out = stage.train_step((images.to(self.device), self.task_plugin.targets_to(labels, self.device), indices))
                lr = out["lr"]
        else:
            for _ in range(self.steps_per_epoch):
                out = stage.train_step()
                if "loss" in out:
                    losses.append(out["loss"])
        stage.gather_to_main()
        seconds = time.perf_counter() - start
        train_loss = torch.tensor([statistics.fmean(losses) if losses else float("nan")], dtype=torch.float64)
        dist.broadcast(train_loss, src=self.dist.world_size - 1)  # the task loss is the last stage's
        return {"epoch": epoch, "train_loss": float(train_loss), "lr": lr, "seconds": seconds}

    def seed_epoch(self, epoch: int) -> None:
        """Seed this process's global RNG, which the augmentations draw from, for ``epoch``."""
        torch.manual_seed(epoch_seed(self.cfg["seed"], epoch, self.dist.rank))

    def _measured_step(self, images, labels, indices) -> dict[str, float]:
        """One steady-state step on CPU, measured by the live-tensor tracker (deterministic).

        Everything alive when it starts counts: weights, the previous step's gradients (a
        global step frees them only at its start), optimizer state, the bank and the batch.
        """
        from fba.bench.memory import peak_memory

        import itertools

        result: dict[str, float] = {}
        learner = self.learner
        # A generator, not a list: a list would keep the old gradients alive after the step
        # sets them to None, and count them twice.
        existing = itertools.chain(
            (images, labels, indices), learner.parameters(), learner.buffers(),
            (p.grad for p in learner.parameters() if p.grad is not None),
            (t for opt in learner.optimizers for state in opt.state.values() for t in state.values() if torch.is_tensor(t)),
            learner.bank.tensors() if learner.bank is not None else ())
        measured = peak_memory(lambda: result.update(learner.train_step(images, labels, indices)), existing=existing)
        self.peak_memory_bytes = measured["peak_bytes"]
        return result

    def _checkpoint(self, epoch: int, rows: list[dict[str, Any]]) -> None:
        state = {"rows": rows, "learner": self.learner.training_state(), "peak_memory_bytes": self.peak_memory_bytes}
        save_checkpoint(self.run_dir / "checkpoints", self.learner.weights(), state, epoch, data_facts=self.data_facts())

    def data_facts(self) -> dict[str, Any]:
        """The facts of the data that the model was built from (saved with its weights): its
        shape facts, and the class names where the dataset has them (to label predictions)."""
        facts: dict[str, Any] = {key: getattr(self.info, key) for key in ("in_channels", "num_classes", "num_train")
                                 if isinstance(getattr(self.info, key, None), int)}
        names = getattr(self.info, "class_names", None)
        if names and all(isinstance(name, str) for name in names):
            facts["class_names"] = list(names)
        return facts

    def summary(self) -> dict[str, Any]:
        timed = [r["seconds"] for r in self.rows]
        evaluated = next((r for r in reversed(self.rows) if "test_loss" in r), {})
        metrics = {k: v for k, v in evaluated.items() if k not in ("epoch", "train_loss", "lr", "seconds")}
        # Reports and ``fba compare`` read the primary metric of every run, evaluated or not.
        metrics.setdefault(get_task(self.cfg["task"]).primary_metric, None)
        return {
            "run_dir": str(self.run_dir),
            "task": self.cfg["task"],
            **metrics,
            "peak_memory_bytes": self.peak_memory_bytes,
            "seconds_per_epoch": statistics.fmean(timed) if timed else None,
            "world_size": self.dist.world_size,
            "distributed_mode": self.cfg["distributed"]["mode"] if self.dist.enabled else None,
            "epochs": len(self.rows),
            "method": self.cfg["method"],
            "model": self.cfg["model"],
            "K": self.learner.K,
            "dataset": self.cfg["data"]["name"],
        }
