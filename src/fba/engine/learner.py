"""LocalLearner: K gradient-isolated modules, their auxiliary networks, and the local step."""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor, nn

from fba.engine.bank import FeatureBank
from fba.engine.bn import frozen_bn_statistics
from fba.engine.checkpointing import BatchChunkable
from fba.errors import NonFiniteLossError

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
STEP_MODES = ("global", "per_module")


class Collectives(Protocol):
    """What the learner and the bank need from a process group (see :mod:`fba.distributed`)."""

    rank: int
    world_size: int

    def gather_rows(self, t: Tensor) -> Tensor:
        """Concatenate every process's ``t`` along dim 0, in rank order (sizes may differ)."""
        ...


@dataclass
class PartialStep:
    """What :meth:`LocalLearner.train_modules` hands on.

    Attributes:
        output: the last trained module's output, detached.
        losses: ``{"loss", "lr", "loss/k"}`` as :meth:`LocalLearner.train_step` returns.
        bank_features: the in-pass bank summaries of this step (module -> ``(N, C_k)``).
        bank_entries: the long-term entries of this step ``(indices, summaries)``, where the
            last module ran here.
    """

    output: Tensor
    losses: dict[str, float]
    bank_features: dict[int, Tensor]
    bank_entries: tuple[Tensor, Tensor] | None


def detached(x: Any) -> Any:
    """``x`` cut from autograd: a tensor, or a list or tuple of them (a detection batch of
    differently sized images); anything else as it is."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(detached(item) for item in x)
    return x


class LocalUnit(nn.Module):
    """Module k together with what computes its loss (aux k, or the head for the last module).

    This is the unit of gradient isolation and, when distributed, of DDP gradient averaging:
    ``forward(h_in, targets) -> (h_out, loss)`` touches exactly the parameters it registers.
    """

    def __init__(self, learner: "LocalLearner", k: int) -> None:
        super().__init__()
        self.k = k
        self.module = learner.local_modules[k]
        self.loss_net = learner.aux_nets[k] if k < learner.K - 1 else learner.head
        # A weak back-reference: a strong one would make learner and units a reference cycle,
        # so a deleted learner (and its device memory) would live on until a full gc pass.
        object.__setattr__(self, "_learner", weakref.ref(learner))

    def forward(self, h_in: Tensor, targets: Any) -> tuple[Tensor, Tensor]:
        learner = self._learner()
        assert learner is not None, "the learner of this unit was deleted"
        h = self.module(h_in)
        if learner.bank is not None:
            learner.bank.write(self.k, h)
        if self.k < learner.K - 1:
            loss = learner.method.local_loss(self.k, self.loss_net, h, targets, learner.bank)
        else:
            loss = learner.task.loss(self.loss_net(h), targets)
        return h, loss


class LocalLearner(nn.Module):
    """Trains a backbone cut into K modules, each by its own local loss.

    Args:
        plain: the inference model whose parameters the modules and head share.
        local_modules: the K modules, in forward order.
        head: the task head, applied after the last module.
        aux_nets: K-1 auxiliary networks (empty for end-to-end methods).
        method: computes each non-last module's local loss.
        task: provides the task loss for the last module.
        make_optimizer: builds an optimizer over a parameter iterable.
        make_scheduler: builds a per-step LR scheduler for an optimizer (optional).
        step_mode: ``"global"`` or ``"per_module"``.
        bank: the feature bank, or None.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 uses a grad scaler on CUDA).
        aux_lr_scale: the auxiliary networks' learning rate as a multiple of the backbone's.
            Other than 1, each optimizer that has auxiliary parameters gets two parameter
            groups, ``{"params": ...}`` and ``{"params": ..., "lr_scale": aux_lr_scale}``, which
            ``make_optimizer`` must honour (:func:`fba.build.optimizer_factory` does); one
            without (the last module's, stepped per module) gets the first only.
    """

    def __init__(
        self,
        plain: nn.Module,
        local_modules: Sequence[nn.Module],
        head: nn.Module,
        aux_nets: Sequence[nn.Module],
        method: Any,
        task: Any,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory | None = None,
        step_mode: str = "global",
        bank: FeatureBank | None = None,
        precision: str = "fp32",
        aux_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {step_mode!r}")
        if len(aux_nets) not in (0, len(local_modules) - 1):
            raise ValueError(f"expected {len(local_modules) - 1} auxiliary networks, got {len(aux_nets)}")
        self.local_modules = nn.ModuleList(local_modules)
        self.head = head
        self.aux_nets = nn.ModuleList(aux_nets)
        # Not registered: its parameters are the modules' and head's, under torchvision's names.
        object.__setattr__(self, "_plain", plain)
        self.method = method
        self.task = task
        self.step_mode = step_mode
        self.bank = bank
        self.precision = precision
        self.aux_lr_scale = aux_lr_scale
        self.global_step = 0
        self.optimizers = [make_optimizer(params) for params in self._parameter_groups()]
        self.schedulers = [make_scheduler(opt) for opt in self.optimizers] if make_scheduler else []
        self.scaler: torch.amp.GradScaler | None = None
        # A plain list: the units share the modules registered above, so they are not
        # registered a second time. distribute() may wrap each in DDP.
        self.units: list[nn.Module] = [LocalUnit(self, k) for k in range(self.K)]
        self.world_size = 1
        self.collectives: Collectives | None = None
        self._check_every_parameter_is_trained()

    @property
    def K(self) -> int:
        return len(self.local_modules)

    @property
    def plain(self) -> nn.Module:
        return self._plain

    def _parameter_groups(self) -> list[list[nn.Parameter]] | list[list[dict[str, Any]]]:
        """What each optimizer steps: one optimizer for a global step; otherwise module k + aux k.

        Each parameter is owned once: a parameter shared between an auxiliary network and the
        main network (the shared-head option) belongs to the module that owns it, so one
        optimizer steps it at the backbone's rate. With ``aux_lr_scale`` other than 1, an
        optimizer's auxiliary parameters form a second group that carries the scale.
        """
        owned: set[int] = set()
        main: list[list[nn.Parameter]] = []
        for k, module in enumerate(self.local_modules):
            params = list(module.parameters()) + (list(self.head.parameters()) if k == self.K - 1 else [])
            owned.update(id(p) for p in params)
            main.append(params)
        aux: list[list[nn.Parameter]] = [[] for _ in main]
        for k, net in enumerate(self.aux_nets):
            aux[k] = [p for p in net.parameters() if id(p) not in owned]
            owned.update(id(p) for p in aux[k])
        if self.step_mode == "global":
            main, aux = [[p for params in main for p in params]], [[p for params in aux for p in params]]
        if self.aux_lr_scale == 1.0:
            return [m + a for m, a in zip(main, aux)]
        return [[{"params": m}] + ([{"params": a, "lr_scale": self.aux_lr_scale}] if a else [])
                for m, a in zip(main, aux)]

    def _check_every_parameter_is_trained(self) -> None:
        """A trainable parameter of the plain model in no optimizer would silently stay at its init."""
        stepped = {id(p) for opt in self.optimizers for group in opt.param_groups for p in group["params"]}
        orphans = [name for name, p in self._plain.named_parameters() if p.requires_grad and id(p) not in stepped]
        if orphans:
            raise ValueError(f"{len(orphans)} parameter(s) of the model belong to no local module or head and would "
                             f"never be trained: {', '.join(orphans[:3])}{' ...' if len(orphans) > 3 else ''}")

    # ---- the local step --------------------------------------------------------------------
    def train_step(self, inputs: Tensor, targets: Any, indices: Tensor | None = None) -> dict[str, float]:
        """One local-learning step (DESIGN section 1).

        Each module runs on the detached output of the previous one, its loss is
        back-propagated at once (freeing its graph before the next module runs), and with
        per-module stepping its optimizer steps and drops its gradients right away.

        Args:
            inputs: a batch, e.g. images ``(N, C, H, W)``.
            targets: what the task loss compares against (labels ``(N,)`` for classification).
            indices: dataset indices of the batch ``(N,)``; needed by the long-term bank.

        Returns:
            ``{"loss": last module's task loss, "loss/k": each module's loss, "lr": lr}``.

        Raises:
            NonFiniteLossError: a module's loss is NaN or infinite. The step stops there, half
                done: with per-module stepping the modules before it have stepped (their
                schedulers and ``global_step`` have not), and BatchNorm statistics have seen
                the batch in either mode. Reload a checkpoint before training on (``fba
                train`` stops and keeps its last one).
        """
        return self.train_modules(range(self.K), inputs, inputs, targets, indices).losses

    def train_modules(self, modules: range, inputs: Tensor, h: Tensor, targets: Any,
                      indices: Tensor | None = None, bank_features: dict[int, Tensor] | None = None) -> "PartialStep":
        """The local step restricted to a contiguous range of modules, fed ``h``.

        ``train_step`` is the whole range, fed the inputs. A pipeline stage runs its own
        range on the activations it received (``inputs`` is still the step's input batch,
        which some methods' losses read); only per-module stepping can be split so, because
        then each module's update depends on its own loss alone.

        Args:
            bank_features: in-pass bank summaries that earlier modules wrote this step in
                another process (module index -> ``(N, C_k)``).
        """
        if len(modules) != self.K and self.step_mode != "per_module":
            raise ValueError("training a subset of the modules needs optim.step=per_module")
        self.train()
        per_module = self.step_mode == "per_module"
        optimizers = [self.optimizers[k] for k in modules] if per_module else self.optimizers
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.method.begin_step(detached(inputs), targets)
        if self.bank is not None:
            self.bank.begin_step(indices)
            if self.bank.needs_lookahead:
                self._lookahead(inputs)
            if bank_features:
                self.bank.load_step_features(bank_features)

        losses: list[Tensor] = []
        for k in modules:
            with self._autocast():
                h, loss = self.units[k](detached(h), targets)
            losses.append(loss.detach())
            if per_module:
                self._raise_if_not_finite(losses, first=len(losses) - 1, offset=modules.start)
            self._backward(loss)
            if per_module:
                self._step(self.optimizers[k])
                self.optimizers[k].zero_grad(set_to_none=True)
            h = detached(h)
        if not per_module:
            # One host sync per step instead of one per module; no parameter has moved yet
            # (BatchNorm running statistics have seen the batch).
            self._raise_if_not_finite(losses)
            self._step(self.optimizers[0])
        if self.scaler is not None:
            self.scaler.update()
        features: dict[int, Tensor] = {}
        entries = None
        if self.bank is not None:
            features, entries = self.bank.step_features(), self.bank.step_entries()
            self.bank.end_step()
        lr = optimizers[0].param_groups[0]["lr"]  # the rate this step used
        schedulers = [self.schedulers[k] for k in modules] if per_module and self.schedulers else self.schedulers
        for scheduler in schedulers:
            scheduler.step()
        self.global_step += 1

        values = torch.stack(losses).float().cpu().tolist()
        out = {"loss": values[-1], "lr": lr}
        out.update({f"loss/{k}": v for k, v in zip(modules, values)})
        return PartialStep(h, out, features, entries)

    def distribute(self, wrap: Callable[[nn.Module], nn.Module], collectives: Collectives) -> None:
        """Wrap every local unit (e.g. in DDP) so that each averages its own gradients.

        ``collectives`` lets the processes agree: the long-term bank gathers every process's
        entries, and a non-finite loss on one process stops all of them at the same point.
        """
        self.check_units_own_their_parameters("each unit averages its own gradients, so a shared one cannot "
                                              "be averaged")
        self.units = [wrap(unit) for unit in self.units]
        self.world_size = collectives.world_size
        self.collectives = collectives
        if self.bank is not None:
            self.bank.collectives = collectives

    def check_units_own_their_parameters(self, why: str) -> None:
        """Raise ValueError if a parameter belongs to two local units (``why`` says why that matters)."""
        owner: dict[int, int] = {}
        for k, unit in enumerate(self.units):
            for p in unit.parameters():
                if owner.setdefault(id(p), k) != k:
                    raise ValueError(f"a parameter is shared by local units {owner[id(p)]} and {k}; {why} (with "
                                     "fba.share_head=true, train in one process or set it to false)")

    def undistribute(self) -> None:
        """Drop the DDP wrappers (before the process group goes away)."""
        self.units = [LocalUnit(self, k) for k in range(self.K)]
        self.world_size = 1
        self.collectives = None
        if self.bank is not None:
            self.bank.collectives = None

    def _raise_if_not_finite(self, losses: list[Tensor], first: int = 0, offset: int = 0) -> None:
        """Raise on a NaN or infinite loss, on every process at once when distributed.

        A process that raised alone would leave the others waiting in DDP's all-reduce for ever.
        """
        values = torch.stack(losses[first:]).float()[None]
        if self.collectives is not None:
            values = self.collectives.gather_rows(values)  # (world_size, modules)
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            rank, module = (int(i) for i in bad[0])
            where = f" on rank {rank}" if self.collectives is not None else ""
            raise NonFiniteLossError(
                f"the loss of module {offset + first + module}{where} is {values[rank, module].item()} at step "
                f"{self.global_step}; lower the learning rate or use precision=fp32")

    def _lookahead(self, inputs: Tensor) -> None:
        """One no-grad forward that fills the bank with every module's summary for this batch."""
        assert self.bank is not None
        with torch.no_grad(), self._autocast(), frozen_bn_statistics(self):
            h = inputs
            for k, module in enumerate(self.local_modules):
                h = module(h)
                self.bank.write_lookahead(k, h)  # summarised now, so no full map outlives its module

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        device_type = next(self.parameters()).device.type
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        if self.precision == "fp16" and device_type == "cuda" and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        return torch.autocast(device_type=device_type, dtype=dtype)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    # ---- inference -------------------------------------------------------------------------
    def forward(self, inputs: Tensor) -> Any:
        """The plain model's computation: modules in order, then the head (no bank, no aux)."""
        h = inputs
        for module in self.local_modules:
            h = module(h)
        return self.head(h)

    def export(self) -> nn.Module:
        """A standalone copy of the inference model: backbone and head parameters only."""
        model = copy.deepcopy(self._plain).eval()
        for sub in model.modules():  # training-time memory choices do not travel with the model
            if isinstance(sub, BatchChunkable):
                sub.checkpoint_chunks = 0
        return model

    # ---- persistence -----------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        """Flat tensor dict for safetensors: ``model.*`` (plain names) and ``aux.*``."""
        state = {f"model.{k}": v for k, v in self._plain.state_dict().items()}
        seen = {v.data_ptr() for v in state.values() if v.numel()}
        for k, v in self.aux_nets.state_dict().items():
            if not (v.numel() and v.data_ptr() in seen):  # shared tensors are saved once
                state[f"aux.{k}"] = v
                seen.add(v.data_ptr())
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`weights`; the key set must match exactly."""
        expected = set(self.weights())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"checkpoint does not match this learner: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self._plain.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
        self.aux_nets.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("aux.")}, strict=False)

    def load_model_weights(self, state: dict[str, Tensor]) -> None:
        """Load only the inference model's weights (``model.*``, every one of them) from
        :meth:`weights`; the auxiliary networks' are ignored (e.g. for export or evaluation)."""
        self._plain.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True)

    def training_state(self) -> dict[str, Any]:
        """Everything besides weights that a resumed run needs."""
        return {
            "global_step": self.global_step,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "bank": self.bank.state_dict() if self.bank is not None else {},
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.global_step = state["global_step"]
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(s)
        if state.get("scaler") is not None:
            self.scaler = torch.amp.GradScaler("cuda")
            self.scaler.load_state_dict(state["scaler"])
        if self.bank is not None:
            self.bank.load_state_dict(state.get("bank", {}))
