"""The Triton kernels of the COCO RLE codec (fastvision/triton/masks.py) on CPU
tensors under the Triton interpreter, against the C++ kernels."""

import numpy as np
import pytest
import torch

import fastvision.masks  # noqa: F401  (the ops)
from fastvision.testing import import_triton_kernels_interpreted

pytestmark = pytest.mark.triton

tm = import_triton_kernels_interpreted("fastvision.triton.masks")
OPS = torch.ops.fastvision


def masks(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=g) < 0.5
    m[0] = False  # empty
    if n > 1:
        m[1] = True  # full
    if n > 2:
        m[2] = torch.rand(h, w, generator=g) < 0.02  # sparse, maybe starting with 1
        m[2, 0, 0] = True
    return m


@pytest.mark.parametrize("n,h,w", [(3, 1, 1), (3, 1, 40), (4, 37, 1), (5, 33, 45), (1, 64, 32)])
def test_encode_equals_cpu_kernel(n, h, w):
    m = masks(n, h, w, seed=h * w)
    want = OPS.rle_encode(m)
    for layout in (m, m.transpose(1, 2).contiguous().transpose(1, 2), m.to(torch.uint8) * 7):
        counts, offsets = tm.rle_encode(layout)
        assert torch.equal(counts, want[0]) and torch.equal(offsets, want[1])


def test_encode_empty_batch_and_given_total():
    counts, offsets = tm.rle_encode(torch.zeros(0, 4, 5, dtype=torch.bool))
    assert counts.numel() == 0 and offsets.tolist() == [0]
    m = masks(2, 6, 7)
    total = int(OPS.rle_encode(m)[0].numel()) - 2
    assert torch.equal(tm._encode_launch(m, total)[0], OPS.rle_encode(m)[0])


@pytest.mark.parametrize("n,h,w", [(3, 1, 1), (3, 1, 40), (4, 37, 1), (5, 33, 45)])
def test_decode_equals_cpu_kernel(n, h, w):
    m = masks(n, h, w, seed=n + h)
    counts, offsets = OPS.rle_encode(m)
    sizes = torch.tensor([[h, w]] * n)
    for column_major in (False, True):
        want = OPS.rle_decode(counts, offsets, sizes, column_major)
        assert torch.equal(tm.rle_decode(counts, offsets, sizes, column_major), want)


@pytest.mark.parametrize("counts,offsets,match", [
    ([3, 4], [0, 2], "sum to h \\* w"),
    ([13, -1], [0, 2], "non-negative"),
    ([12], [1, 1], "offsets\\[0\\] must be 0"),
    ([12], [0, 5], "offsets\\[N\\] must be the length"),
])
def test_decode_checks_the_batch(counts, offsets, match):
    with pytest.raises(ValueError, match=match):
        tm.rle_decode(torch.tensor(counts), torch.tensor(offsets), torch.tensor([[3, 4]]), False)
    with pytest.raises(ValueError, match="one size"):
        tm.rle_decode(torch.tensor([12, 12]), torch.tensor([0, 1, 2]), torch.tensor([[3, 4], [4, 3]]), False)
