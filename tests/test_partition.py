import pytest

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
