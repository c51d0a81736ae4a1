"""Group layouts and flat segments: partial sums over any partition add up to whole-tensor sums."""

import math

import pytest
import torch

from ramda_ds.groups import SegmentGroups, layout_for

SHAPES = [((6, 5), "input"), ((6, 5), "output"), ((4, 3, 3), "input"), ((3, 2, 2, 2), "input"),
          ((4, 12), "head:4"), ((7, 5), "element"), ((11,), "element")]


def whole_group_sums(x, layout):
    return x.reshape(layout.rows, layout.groups, layout.inner).double().sum(dim=(0, 2))


@pytest.mark.parametrize("shape,rule", SHAPES)
def test_partition_sums_add_up_and_scaling_matches(shape, rule):
    layout = layout_for(shape, rule)
    x = torch.randn(math.prod(shape), dtype=torch.float64)
    f = torch.rand(layout.groups, dtype=torch.float64)
    ref_sum = whole_group_sums(x, layout)
    ref_scaled = (x.view(layout.rows, layout.groups, layout.inner) * f.view(1, -1, 1)).reshape(-1)
    for trial in range(20):
        cuts = sorted(torch.randint(0, layout.numel + 1, (3,)).tolist())
        bounds = [0, *cuts, layout.numel]
        total = torch.zeros(layout.groups, dtype=torch.float64)
        scaled = torch.empty_like(x)
        for a, b in zip(bounds, bounds[1:]):
            seg = SegmentGroups(layout, a, b)
            part = seg.sum(x[a:b])
            assert part.numel() == seg.num_groups
            total[seg.group_lo:seg.group_lo + seg.num_groups] += part
            seg.mul(x[a:b], f[seg.group_lo:seg.group_lo + seg.num_groups], out=scaled[a:b])
        torch.testing.assert_close(total, ref_sum)
        torch.testing.assert_close(scaled, ref_scaled)


def test_layouts_follow_the_paper():
    assert layout_for((8, 3), "input").group_size == 8  # column of a Linear weight
    assert layout_for((8, 3, 5, 5), "input") == layout_for((8, 3, 25), "input")  # conv channels
    lay = layout_for((16, 12), "head:4")
    assert (lay.groups, lay.group_size) == (3, 64)
    assert layout_for((4, 5), "element").groups == 20
    assert layout_for((8, 3), "input").group_weight == pytest.approx(math.sqrt(8))


@pytest.mark.parametrize("shape,rule,msg", [((5,), "input", "at least 2 dims"),
                                            ((4, 10), "head:3", "multiple of the head size"),
                                            ((4, 4), "diagonal", "unknown grouping")])
def test_bad_layouts_name_the_problem(shape, rule, msg):
    with pytest.raises(ValueError, match=msg):
        layout_for(shape, rule, "model.w")
