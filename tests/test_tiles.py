"""Sliding windows (cachedseg.tiles): where windows lie and how overlapping predictions are weighted; no raster I/O."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedseg.errors import CachedsegError
from cachedseg.tiles import FLOOR, Grid, axis_weights, check_overlap, default_overlap, window_starts


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 2000), size=st.integers(2, 300), data=st.data())
def test_windows_cover_the_raster_inside_its_bounds(length, size, data):
    overlap = data.draw(st.integers(0, size // 2))
    starts = window_starts(length, size, overlap)
    assert starts[0] == 0 and list(starts) == sorted(set(starts))
    if length <= size:
        assert starts == (0,)  # one window, padded: the only case that reads past the raster
        return
    assert all(0 <= s and s + size <= length for s in starts)  # every window inside: no padding
    assert starts[-1] + size == length  # the last one shifted inward to end at the raster's end
    steps = np.diff(starts)
    assert np.all(steps[:-1] == size - overlap) and 0 < steps[-1] <= size - overlap
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered.all()


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 1500), size=st.integers(2, 200), data=st.data())
def test_weights_are_positive_and_sum_to_one_everywhere(length, size, data):
    overlap = data.draw(st.integers(0, size // 2))
    starts = window_starts(length, size, overlap)
    profiles = axis_weights(starts, size, overlap)
    total = np.zeros(max(length, size))
    for s, p in zip(starts, profiles):
        assert p.shape == (size,) and p.dtype == np.float32 and p.min() >= FLOOR and p.max() <= 1
        total[s:s + size] += p
    # a partition of unity up to the floor of the windows that hand over: no pixel counted more than another
    assert np.allclose(total[:length], 1, atol=2 * FLOOR + 1e-6)


def test_weights_ramp_smoothly_over_the_overlap_and_are_one_in_the_centre():
    size, overlap = 112, 14
    starts = window_starts(112 + 98 * 3, size, overlap)  # regular steps: each overlap exactly `overlap` wide
    middle = axis_weights(starts, size, overlap)[1]
    assert np.all(middle[overlap:size - overlap] == 1)  # the centre: this window alone
    ramp = middle[:overlap]
    assert np.all(np.diff(ramp) > 0) and ramp[0] < 0.02 and ramp[-1] > 0.98  # rising smoothly, no step
    assert np.all(np.abs(np.diff(middle)) < 0.12)  # never a jump (a seam) between neighbouring pixels
    first = axis_weights(starts, size, overlap)[0]
    assert np.all(first[:size - overlap] == 1)  # the raster's border is not ramped: nothing else covers it


def test_default_overlap_is_an_eighth_in_whole_patches():
    assert default_overlap((112, 112), 14) == 14
    assert default_overlap((518, 518), 14) == 70
    assert default_overlap((518, 924), 14) == 70  # the shorter side
    assert default_overlap((28, 28), 14) == 14  # at least one patch
    assert default_overlap((224, 224), 16) == 32


@pytest.mark.parametrize("overlap", [-1, 57])
def test_overlap_beyond_half_the_window_is_refused(overlap):
    with pytest.raises(CachedsegError, match="--tile-overlap"):
        check_overlap(overlap, (112, 112))
    check_overlap(56, (112, 112))


def test_rows_are_final_once_no_later_window_touches_them():
    grid = Grid(400, 600, (112, 112), 14)
    assert len(grid) == len(grid.rows) * len(grid.cols)
    for r in range(len(grid.rows)):
        end = grid.final_after(r)
        assert all(y >= end for y in grid.rows[r + 1:])  # later windows start at or below the final rows' end
        assert end <= grid.rows[r] + 112  # and the strip holds every row up to it
    assert grid.final_after(len(grid.rows) - 1) == 400
    w = grid.weight(1, 2)
    assert w.shape == (112, 112) and np.allclose(w, grid.row_weights[1][:, None] * grid.col_weights[2][None])
