"""How each compiled kernel cuts leaves into blocks, checked as plain Python.

The TPU kernel tiles each leaf's (leading, rows, cols) view with regions of
equal blocks; the GPU kernel gives each CUDA block of its grid one block of
one leaf. Both must cover every element exactly once, and a TPU block must fit
the VMEM it is given once padded to the TPU's tiles.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from pallas_amsgrad.kernels import common, gpu, tpu

dims = st.integers(1, 70)
elements = st.sampled_from([16, 32, 64]).map(lambda rows: rows * common.LANES)


def _padded(block):
    *leading, rows, cols = block
    lanes, row_multiple = common.LANES, common.ROW_MULTIPLE
    return (
        math.prod(leading)
        * (-(-rows // row_multiple) * row_multiple)
        * (-(-cols // lanes) * lanes)
    )


# Several slices too big for one block: each block one slice's rows.
@example(shape=(2, 70, 100), elements=64 * common.LANES)
@given(shape=st.tuples(st.integers(1, 5), dims, st.integers(1, 700)), elements=elements)
def test_tpu_regions_cover_every_element_once_within_vmem(shape, elements):
    covered = np.zeros(shape, np.int32)
    for region in tpu.regions(shape, elements):
        assert _padded(region.block) <= elements, region
        splits = (region.leading, region.rows, region.cols)
        for index in np.ndindex(*(split.blocks for split in splits)):
            window = tuple(
                slice(split.start + i * split.size, split.start + (i + 1) * split.size)
                for split, i in zip(splits, index, strict=True)
            )
            covered[window] += 1
    np.testing.assert_array_equal(covered, 1)


@example(shape=(3, 5))
@given(shape=st.lists(st.integers(0, 40), max_size=4).map(tuple))
def test_tpu_views_keep_the_tiled_dims(shape):
    view = tpu.view_shape(shape)
    assert len(view) == 3 and math.prod(view) == math.prod(shape)
    if len(shape) >= 2:
        assert view[1:] == shape[-2:]


@given(leaf_rows=st.lists(st.integers(1, 100), min_size=1, max_size=6), data=st.data())
def test_gpu_segments_give_each_cuda_block_one_block_of_one_leaf(leaf_rows, data):
    block_rows = data.draw(st.sampled_from([16, 32]))
    plan = gpu.segments(leaf_rows, block_rows)
    grid = sum(segment.blocks for segment in plan)
    owners = np.zeros(grid, np.int32)
    covered = [np.zeros(rows, np.int32) for rows in leaf_rows]
    for segment in plan:
        assert 0 < segment.rows <= block_rows, segment
        blocks = slice(segment.first_block, segment.first_block + segment.blocks)
        owners[blocks] += 1
        for i in range(segment.blocks):
            start = segment.row_start + i * segment.rows
            covered[segment.leaf][start : start + segment.rows] += 1
    np.testing.assert_array_equal(owners, 1)
    for leaf_covered in covered:
        np.testing.assert_array_equal(leaf_covered, 1)
