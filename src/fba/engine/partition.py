"""Group a backbone's units into K contiguous gradient-isolated modules.

"K" here is the number of gradient-isolated modules, counting the stem as a unit. For the
CIFAR ResNet-32 (stem + 15 blocks) K=16 puts the stem alone in module 0 and one block in
each later module; the last module also owns the task head. K=1 is end-to-end BP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from fba.engine.units import UnitSpec
from fba.errors import ConfigError

if TYPE_CHECKING:
    from fba.engine.balance import UnitActivationBytes

PARTITION_MODES = ("auto", "count", "stage", "cuts", "balanced")


def partition_units(
    specs: Sequence[UnitSpec],
    K: int,
    mode: str = "auto",
    cuts: Sequence[int] | None = None,
    costs: "UnitActivationBytes | Callable[[], UnitActivationBytes] | None" = None,
    checkpointed: "frozenset[int] | Callable[[], frozenset[int]]" = frozenset(),
) -> list[list[int]]:
    """Return K lists of unit indices, contiguous and covering every unit once.

    Args:
        specs: the units' shape specs, in forward order.
        K: number of modules.
        mode: ``"count"`` splits the units as evenly as possible (earlier modules take the
            remainder); ``"stage"`` needs K equal to the number of stages and merges the stem
            into the first stage; ``"cuts"`` starts a new module at each index in ``cuts``;
            ``"auto"`` is ``"cuts"`` when cuts are given, ``"stage"`` when K equals the number
            of stages (and differs from the unit count), else ``"count"``; ``"balanced"``
            minimises the largest module's activation bytes, measured in ``costs``
            (:mod:`fba.engine.balance`).
        cuts: unit indices where modules 1..K-1 begin, strictly increasing in [1, n-1].
        costs: each unit's measured activation bytes, or a callable that measures them
            (called only once K and the cuts are known to be valid); read by ``"balanced"`` only.
        checkpointed: the modules that will run under activation checkpointing, which
            ``"balanced"`` costs as such, or a callable that names them (called like ``costs``).
    """
    n = len(specs)
    if mode not in PARTITION_MODES:
        raise ConfigError(f"partition: unknown mode {mode!r}; choose one of: {', '.join(PARTITION_MODES)}")
    num_stages = max(s.stage for s in specs)
    if mode == "auto":
        if cuts:
            mode = "cuts"
        elif K == num_stages and K != n:
            mode = "stage"
        else:
            mode = "count"
    if mode == "cuts":
        return _by_cuts(n, list(cuts or []), K)
    if cuts:
        raise ConfigError(f"cuts={list(cuts)} are read only with partition=cuts or auto, not partition={mode}; "
                          "drop one of the two")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= n:
        raise ConfigError(f"K={K!r} is impossible for a backbone of {n} units: choose K in 1..{n}")
    if mode == "balanced":
        if K in (1, n):  # one partition only: nothing to measure
            mode = "count"
        elif costs is None:
            raise ValueError("partition_units(mode='balanced') needs the units' measured costs")
        else:
            from fba.engine.balance import memory_balanced_groups

            return memory_balanced_groups(costs() if callable(costs) else costs, K,
                                          checkpointed() if callable(checkpointed) else checkpointed)
    if mode == "stage":
        if K != num_stages:
            raise ConfigError(f"K={K} with partition=stage: this backbone has {num_stages} stages, so K must be {num_stages}")
        stage_of = [max(1, s.stage) for s in specs]
        return [[i for i in range(n) if stage_of[i] == st] for st in range(1, num_stages + 1)]
    base, extra = divmod(n, K)
    groups, start = [], 0
    for k in range(K):
        size = base + (1 if k < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def check_partition(specs: Sequence[UnitSpec], K: int, mode: str = "auto", cuts: Sequence[int] | None = None) -> None:
    """Raise the :class:`ConfigError` that :func:`partition_units` would, measuring nothing
    (``"balanced"`` is checked on uniform stand-in costs instead of a probe)."""
    from fba.engine.balance import UnitActivationBytes

    n = len(specs)
    partition_units(specs, K, mode, cuts, costs=UnitActivationBytes([0] * n, [1] * n, [0] * n, [0] * n))


def _by_cuts(n: int, cuts: list[int], K: int | None) -> list[list[int]]:
    if any(isinstance(c, bool) or not isinstance(c, int) for c in cuts):
        raise ConfigError(f"cuts={cuts!r}: cut points must be integers")
    if any(b <= a for a, b in zip(cuts, cuts[1:])) or (cuts and (cuts[0] < 1 or cuts[-1] > n - 1)):
        raise ConfigError(f"cuts={cuts!r}: cut points must be strictly increasing unit indices in 1..{n - 1}")
    if K is not None and K != len(cuts) + 1:
        raise ConfigError(f"K={K} does not match cuts={cuts!r}, which make {len(cuts) + 1} modules")
    bounds = [0, *cuts, n]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
