"""The mask codecs on a GPU (skipped without CUDA): the Triton encode and decode
against the C++ kernels, through the public functions and the registered ops."""

import pytest
import torch

import fastvision.masks as fm

pytestmark = pytest.mark.gpu
OPS = torch.ops.fastvision


@pytest.mark.parametrize("n,h,w", [(3, 1, 1), (4, 37, 1), (5, 480, 640), (2, 1024, 1024)])
def test_cuda_encode_decode_equal_cpu(n, h, w):
    g = torch.Generator().manual_seed(n * h)
    m = torch.rand(n, h, w, generator=g) < 0.5
    m[0] = False
    m[-1, :h // 2] = True
    want = fm.rle_encode(m)
    for layout in (m.cuda(), m.cuda().transpose(1, 2).contiguous().transpose(1, 2), m.cuda().to(torch.uint8)):
        got = fm.rle_encode(layout)
        assert got.counts.is_cuda
        assert torch.equal(got.counts.cpu(), want.counts) and torch.equal(got.offsets.cpu(), want.offsets)
        assert torch.equal(fm.rle_decode(got).cpu(), m)  # device RLEs: the registered op's CUDA kernel
    assert torch.equal(fm.rle_decode(want, device="cuda").cpu(), m)  # host RLEs decoded on the GPU
    assert torch.equal(fm.rle_decode(want.to_coco(), device="cuda").cpu(), m)


def test_cuda_decode_rejects_bad_counts():
    counts = torch.tensor([3, 4], device="cuda")
    with pytest.raises(ValueError, match="sum to h \\* w"):
        OPS.rle_decode(counts, torch.tensor([0, 2], device="cuda"), torch.tensor([[3, 4]]), False)
    with pytest.raises(ValueError, match="uint8 or bool"):
        OPS.rle_encode(torch.zeros(2, 3, 4, device="cuda"))
