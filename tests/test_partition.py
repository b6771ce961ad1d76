import itertools
import math
from dataclasses import replace

import pytest
import torch

from fba.engine.balance import UnitActivationBytes, memory_balanced_groups
from fba.engine.partition import partition_units
from fba.errors import ConfigError
from fba.tasks.classification.models import MODELS


def specs(name):
    return MODELS.get(name)(num_classes=10).specs


def test_resnet32_K16_is_stem_then_one_block_each():
    groups = partition_units(specs("resnet32"), 16)
    assert groups == [[i] for i in range(16)]


def test_count_split_is_contiguous_and_covers_every_unit():
    s = specs("resnet32")
    for K in range(1, 17):
        groups = partition_units(s, K, "count")
        assert len(groups) == K
        assert [i for g in groups for i in g] == list(range(16))
        assert all(g for g in groups)


def test_stage_split_merges_stem_into_first_stage():
    groups = partition_units(specs("resnet101"), 4)
    assert groups[0][0] == 0 and len(groups[0]) == 1 + 3
    assert [len(g) for g in groups] == [4, 4, 23, 3]


def test_cut_points():
    assert partition_units(specs("resnet8"), 2, "cuts", [2]) == [[0, 1], [2, 3]]
    assert partition_units(specs("resnet8"), 3, "auto", [1, 3]) == [[0], [1, 2], [3]]


@pytest.mark.parametrize("K", [0, -1, 17])
def test_impossible_K_names_the_valid_range(K):
    with pytest.raises(ConfigError, match=r"choose K in 1\.\.16"):
        partition_units(specs("resnet32"), K)


@pytest.mark.parametrize("cuts", [[3, 2], [0, 2], [2, 2], [1, 4]])
def test_bad_cuts(cuts):
    with pytest.raises(ConfigError, match="strictly increasing"):
        partition_units(specs("resnet8"), len(cuts) + 1, "cuts", cuts)


def test_stage_mode_needs_K_equal_stages():
    with pytest.raises(ConfigError, match="3 stages"):
        partition_units(specs("resnet32"), 4, "stage")


@pytest.mark.parametrize("mode", ["count", "stage"])
def test_cuts_with_another_mode_are_refused(mode):
    # They used to be ignored: K=2, partition=count, cuts=[1] split [[0, 1], [2, 3]].
    with pytest.raises(ConfigError, match=f"only with partition=cuts or auto, not partition={mode}"):
        partition_units(specs("resnet8"), 2 if mode == "count" else 3, mode, [1])


# ---- partition=balanced ---------------------------------------------------------------------


def _all_partitions(n, K):
    for cuts in itertools.combinations(range(1, n), K - 1):
        bounds = [0, *cuts, n]
        yield [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def _largest(costs, groups, checkpointed=frozenset()):
    return max(costs.module_bytes(g[0], g[-1], k in checkpointed) for k, g in enumerate(groups))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_weights", [False, True])
def test_balanced_groups_minimise_the_largest_module_plus_the_auxiliary_weights(seed, with_weights):
    rng = torch.Generator().manual_seed(seed)
    n = 9
    costs = UnitActivationBytes(*[torch.randint(1, 1000, (n,), generator=rng).tolist() for _ in range(4)])
    if with_weights:  # the last unit's "auxiliary network" is the head, which every partition has
        costs = replace(costs, loss_net_weights=torch.randint(0, 500, (n - 1,), generator=rng).tolist() + [0])
    for K in range(1, n + 1):
        for checkpointed in (frozenset(), frozenset({0}), frozenset(range(K))):
            groups = memory_balanced_groups(costs, K, checkpointed)
            assert len(groups) == K and [i for g in groups for i in g] == list(range(n))
            best = min(costs.partition_bytes(p, checkpointed) for p in _all_partitions(n, K))
            assert costs.partition_bytes(groups, checkpointed) == best
            if not with_weights:
                assert costs.partition_bytes(groups, checkpointed) == _largest(costs, groups, checkpointed)


def test_module_bytes_of_a_checkpointed_module_count_the_recomputation_or_the_loss_side_not_both():
    costs = UnitActivationBytes(input=[1, 2], unit=[40, 30], output=[2, 3], loss_net=[50, 20])
    # the loss side's backward frees what it saved before the units are recomputed
    assert costs.module_bytes(0, 1, checkpointed=True) == 1 + 2 + 3 + max(40, 20)
    assert costs.module_bytes(0, 0, checkpointed=True) == 1 + 2 + max(40, 50)
    assert costs.module_bytes(0, 1) == 1 + 40 + 30 + 20
    assert with_grads_of(costs).at_batch(2).grads == [5, 7]


def with_grads_of(costs):
    return replace(costs, grads=[5, 7], loss_net_grads=[11, 13])


def test_module_bytes_count_each_gradient_from_the_backward_phase_that_makes_it():
    costs = UnitActivationBytes(input=[1, 2], unit=[40, 30], output=[2, 3], loss_net=[50, 20])
    grads = with_grads_of(costs)
    # loss side's backward: every activation and the loss side's gradients (13); unit 1's: its
    # and unit 0's activations, gradients 13 + 7; unit 0's: its own, gradients 13 + 7 + 5
    assert grads.module_bytes(0, 1) == max(1 + 40 + 30 + 20 + 13, 1 + 40 + 30 + 13 + 7, 1 + 40 + 13 + 7 + 5)
    # gradients that come after the heavy activations are gone do not set the peak
    light_first = replace(grads, unit=[4, 30], grads=[60, 7])
    assert light_first.module_bytes(0, 1) == max(1 + 4 + 30 + 20 + 13, 1 + 4 + 30 + 13 + 7, 1 + 4 + 13 + 7 + 60)
    assert light_first.module_bytes(0, 1) < 1 + 4 + 30 + 20 + 13 + 7 + 60  # the old upper bound
    # checkpointed: the inputs and output held, then the largest phase
    assert grads.module_bytes(0, 1, checkpointed=True) == 1 + 2 + 3 + max(20 + 13, 30 + 13 + 7, 40 + 13 + 7 + 5)
    assert grads.module_bytes(1, 1, checkpointed=True) == 2 + 3 + max(20 + 13, 30 + 13 + 7)


def test_a_heavy_auxiliary_network_moves_the_cut_that_activations_alone_would_choose():
    costs = UnitActivationBytes(input=[0] * 4, unit=[10, 10, 1, 1], output=[0] * 4, loss_net=[0] * 4)
    assert memory_balanced_groups(costs, 2) == [[0], [1, 2, 3]]  # largest module 12
    # a module ending at unit 0 would train an auxiliary network of 5 bytes, one ending at
    # unit 1 one of 1 byte: 10 + 5 against 20 + 1 still cuts after unit 0 ...
    assert memory_balanced_groups(replace(costs, loss_net_weights=[5, 1, 1, 0]), 2) == [[0], [1, 2, 3]]
    # ... but 12 + 15 against 20 + 1 does not
    assert memory_balanced_groups(replace(costs, loss_net_weights=[15, 1, 1, 0]), 2) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("make, expected", [
    (lambda p: torch.optim.SGD(p, lr=0.1), 0.0),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), 1.0),
    (lambda p: torch.optim.Adam(p), 2.0),
    (lambda p: torch.optim.AdamW(p, weight_decay=0.05), 2.0),
])
def test_optimizer_state_per_parameter_byte(make, expected):
    from fba.engine.balance import optimizer_state_per_parameter_byte

    parameter = torch.ones(3, requires_grad=True)
    optimizer = make([parameter])
    assert optimizer_state_per_parameter_byte(optimizer) == expected
    assert torch.equal(parameter, torch.ones(3)) and not optimizer.state  # the run's optimizer is untouched


def test_measured_auxiliary_weights_are_each_networks_parameters_buffers_and_optimizer_state():
    from fba.build import build_learner, measure_partition_costs, resolve_device

    # one unit per module: the learner's own auxiliary networks are the probe's
    learner = build_learner(model="resnet8", method="fba", K=4, num_classes=4, **{"optim.name": "adamw"})
    costs = measure_partition_costs(learner.config, 4, 4, 3, None, resolve_device("cpu"))
    for net, measured in zip(learner.aux_nets, costs.loss_net_weights):
        params = sum(p.numel() * p.element_size() for p in net.parameters())
        buffers = sum(b.numel() * b.element_size() for b in net.buffers())
        assert measured == 3 * params + buffers  # the weights, AdamW's two moments, BatchNorm's statistics
    assert len(costs.loss_net_weights) == 4 and costs.loss_net_weights[-1] == 0
    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    assert costs.grads == [nbytes(unit) for unit in learner.local_modules]
    assert costs.loss_net_grads == [nbytes(net) for net in learner.aux_nets] + [nbytes(learner.head)]
    # activations are given at the run's batch, the weights do not grow with it
    double = measure_partition_costs({**learner.config, "data": {**learner.config["data"],
                                      "batch_size": 2 * learner.config["data"]["batch_size"]}},
                                     4, 4, 3, None, resolve_device("cpu"))
    assert double.loss_net_weights == costs.loss_net_weights and double.grads == costs.grads
    for a, b in zip(costs.unit + costs.input + costs.loss_net, double.unit + double.input + double.loss_net):
        assert b == pytest.approx(2 * a, rel=0.02, abs=8)


def test_balanced_groups_move_cuts_towards_the_heavy_units():
    # Units 0-1 are ten times heavier than the rest: a count split would pair them.
    costs = UnitActivationBytes(input=[0] * 6, unit=[10, 10, 1, 1, 1, 1], output=[0] * 6, loss_net=[0] * 6)
    assert memory_balanced_groups(costs, 2) == [[0], [1, 2, 3, 4, 5]]
    # checkpointed, module 0 holds one unit's activations at a time: it can take both
    assert memory_balanced_groups(costs, 2, frozenset({0})) == [[0, 1], [2, 3, 4, 5]]


def test_balanced_partition_of_a_learner_is_the_best_by_its_measured_costs():
    from fba.build import build_learner, measure_partition_costs, resolve_device

    kwargs = dict(model="resnet8", method="dgl", K=2, num_classes=4, **{"data.image_size": 16})
    balanced = build_learner(partition="balanced", **kwargs)
    cfg = balanced.config
    costs = measure_partition_costs(cfg, 4, 4, 3, None, resolve_device("cpu"))
    assert all(value > 0 for value in costs.unit) and all(value > 0 for value in costs.loss_net)
    assert costs.partition_bytes(balanced.groups) == min(costs.partition_bytes(p) for p in _all_partitions(4, 2))
    # the probe draws from its own RNG stream: the same initial weights, auxiliary networks
    # included (they are built after the probe), as the same cuts given by hand
    cuts = [group[0] for group in balanced.groups[1:]]
    pinned = build_learner(partition="cuts", cuts=cuts, **kwargs)
    assert pinned.groups == balanced.groups
    for a, b in zip(balanced.state_dict().values(), pinned.state_dict().values()):
        assert torch.equal(a, b)


def test_measured_unit_bytes_scale_with_the_image_area():
    from fba.build import build_learner, measure_partition_costs, resolve_device

    learner = build_learner(model="resnet8", method="fba", K=2, num_classes=4)
    small = measure_partition_costs({**learner.config, "data": {**learner.config["data"], "image_size": 32}},
                                    4, 4, 3, None, resolve_device("cpu"))
    large = measure_partition_costs({**learner.config, "data": {**learner.config["data"], "image_size": 64}},
                                    4, 4, 3, None, resolve_device("cpu"))
    # up to BatchNorm's per-channel statistics, which do not grow with the image (nor do the
    # pooled heads of classification's auxiliary networks: the probe size matters there)
    for a, b in zip(small.unit + small.input, large.unit + large.input):
        assert b == pytest.approx(4 * a, rel=0.02)


def test_balanced_partition_of_one_or_every_unit_needs_no_costs():
    s = specs("resnet8")
    assert partition_units(s, 1, "balanced") == [[0, 1, 2, 3]]
    assert partition_units(s, 4, "balanced") == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="measured costs"):
        partition_units(s, 2, "balanced")
    with pytest.raises(ConfigError, match="choose K in 1..4"):
        partition_units(s, 5, "balanced")


@pytest.mark.parametrize("source", ["longterm", "lookahead", "inpass"])
def test_balanced_partition_builds_with_every_fba_bank(source):
    from fba.build import build_learner

    learner = build_learner(model="resnet8", method="fba", K=2, num_classes=4, num_samples=10, partition="balanced",
                            **{"data.image_size": 16, "fba.bank.source": source})
    assert [i for g in learner.groups for i in g] == [0, 1, 2, 3] and learner.K == 2


@pytest.mark.parametrize("task, model", [("classification", "resnet8"), ("super_resolution", "edsr_tiny")])
@pytest.mark.parametrize("method", ["fba", "dgl"])
def test_balanced_partition_trains_on_each_task(task, model, method):
    from fba.build import build_learner
    from fba.tasks import get_task

    learner = build_learner(task=task, model=model, method=method, K=3, num_classes=4, num_samples=10,
                            partition="balanced", **{"data.image_size": 16})
    assert learner.K == 3 and sum(len(g) for g in learner.groups) == len(learner.groups[-1]) + learner.groups[-1][0]
    inputs, targets = get_task(task).synthetic_batch(learner.config, 2, 3, 16, 4, torch.Generator().manual_seed(0),
                                                     torch.device("cpu"))
    assert math.isfinite(learner.train_step(inputs, targets, torch.arange(2))["loss"])


def test_balanced_partition_refuses_cuts_before_running_its_probe():
    def measure():
        raise AssertionError("the probe ran")

    with pytest.raises(ConfigError, match="not partition=balanced"):
        partition_units(specs("resnet8"), 2, "balanced", [1], costs=measure)
    with pytest.raises(ConfigError, match="choose K in 1..4"):
        partition_units(specs("resnet8"), 7, "balanced", costs=measure)


def test_autocast_copies_of_the_weights_are_not_counted_as_activations():
    # A bf16 copy of each weight is saved for backward. It does not grow with the image, and
    # counted it dominated a small probe (a stage-3 unit: 1.3x, not 4x, from 16 to 32 px).
    from fba.build import build_learner, measure_partition_costs, resolve_device

    learner = build_learner(model="resnet32", K=4, precision="bf16", num_samples=10)
    small, large = (measure_partition_costs({**learner.config, "data": {**learner.config["data"], "image_size": size}},
                                            16, 10, 3, 2, resolve_device("cpu")) for size in (16, 32))
    for a, b in zip(small.unit, large.unit):
        assert b == pytest.approx(4 * a, rel=0.1)
