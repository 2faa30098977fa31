"""The one padding helper, left and right, with empty rows and a minimum width."""

import pytest
import torch

from lit_align.padding import pad_rows


def test_left_and_right_padding_by_hand():
    ids, mask = pad_rows([[5, 6, 7], [8], []], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], 9, side="right", min_width=5)
    assert ids.tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_bad_side_and_no_rows():
    with pytest.raises(ValueError, match="side must be"):
        pad_rows([[1]], 0, side="middle")
    ids, mask = pad_rows([], 0, side="right", min_width=1)
    assert ids.shape == mask.shape == (0, 1)
