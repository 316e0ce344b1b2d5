"""Triton kernels of the COCO RLE codec (CUDA; CPU tensors under TRITON_INTERPRET=1).

Encode, N masks (N, H, W) of any strides (row-major and column-major read
coalesced along their contiguous axis), with one device-to-host
synchronisation for the whole batch (segment-anything's mask_to_rle_pytorch
makes one per mask):

1. ``_transitions_kernel`` (count pass): per tile of TY rows x TX columns,
   flag every pixel whose value differs from the pixel before it in
   column-major order (the pixel above; for row 0 the last pixel of the
   previous column; for pixel 0 a zero) and store each column's flag count
   per tile: colcnt (N, W, R), R = cdiv(H, TY), which flattened is
   column-major order within a mask;
2. an exclusive prefix sum over colcnt (torch.cumsum) gives every (mask,
   column, tile) its first output slot; its last entry, the number of
   transitions, is the one value read back (to size the output);
3. ``_transitions_kernel`` (write pass): the same flags, ranked down each
   column within the tile (tl.cumsum), write each transition's position
   x * H + y to its slot (mask n's slots shifted by n: each mask has one
   more count than transitions);
4. counts = differences of consecutive positions, with 0 before each mask's
   first and H * W after its last (torch ops on the device).

Decode: each pixel finds its run by binary search over the mask's
cumulative counts (``_decode_kernel``; writes (N, H, W) row-major, coalesced).

Functions named like the registered ops (``rle_encode``, ``rle_decode``) are
the CUDA kernels of those ops (fastvision/masks/rle.py registers them).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["rle_encode", "rle_decode"]

TY, TX = 32, 32


@triton.jit
def _transitions_kernel(masks, colcnt, base, pos, H, W, R, sn, sh, sw, TY: tl.constexpr, TX: tl.constexpr,
                        WRITE: tl.constexpr):
    n = tl.program_id(0)
    r = tl.program_id(1)
    c = tl.program_id(2)
    y = r * TY + tl.arange(0, TY)[:, None]
    x = c * TX + tl.arange(0, TX)[None, :]
    inside = (y < H) & (x < W)
    m = masks + n.to(tl.int64) * sn
    v = tl.load(m + y.to(tl.int64) * sh + x.to(tl.int64) * sw, mask=inside, other=0) != 0
    # The pixel before in column-major order: above, or the previous column's last.
    py = tl.where(y > 0, y - 1, H - 1)
    px = tl.where(y > 0, x, x - 1)
    prev = tl.load(m + py.to(tl.int64) * sh + px.to(tl.int64) * sw, mask=inside & (px >= 0), other=0) != 0
    flag = (v != prev) & inside
    f = flag.to(tl.int32)
    if WRITE:
        rank = tl.cumsum(f, axis=0) - f  # transitions above, in this tile's column
        cols = c * TX + tl.arange(0, TX)
        slot = tl.load(base + (n.to(tl.int64) * W + cols) * R + r, mask=cols < W, other=0)
        dest = slot[None, :] + n + rank
        tl.store(pos + dest, x.to(tl.int64) * H + y, mask=flag)
    else:
        cols = c * TX + tl.arange(0, TX)
        tl.store(colcnt + (n.to(tl.int64) * W + cols) * R + r, tl.sum(f, axis=0), mask=cols < W)


def _encode_launch(masks: torch.Tensor, total: int | None = None):
    """counts, offsets of masks (N, H, W); `total` (transitions of the batch) is read
    back from the device unless given (the one synchronisation)."""
    N, H, W = masks.shape
    dev = masks.device
    data = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    R = triton.cdiv(max(H, 1), TY)
    grid = (N, R, triton.cdiv(max(W, 1), TX))
    colcnt = torch.zeros(N, W, R, dtype=torch.int32, device=dev)
    args = (H, W, R, data.stride(0), data.stride(1), data.stride(2))
    if N and H and W:
        _transitions_kernel[grid](data, colcnt, colcnt, colcnt, *args, TY=TY, TX=TX, WRITE=False)
    flat = colcnt.view(-1).to(torch.int64)
    inclusive = flat.cumsum(0)
    if total is None:
        total = int(inclusive[-1]) if flat.numel() else 0  # the one device-to-host sync
    base = inclusive - flat  # exclusive: each (mask, column, tile)'s first slot
    per_mask = flat.view(N, W * R).sum(1) + 1  # counts per mask = transitions + 1
    offsets = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    offsets[1:] = per_mask.cumsum(0)
    pos = torch.empty(total + N, dtype=torch.int64, device=dev)
    if N and H and W:
        _transitions_kernel[grid](data, colcnt, base, pos, *args, TY=TY, TX=TX, WRITE=True)
    pos[offsets[1:] - 1] = H * W  # each mask ends at H * W
    prev = torch.empty_like(pos)
    prev[1:] = pos[:-1]
    prev[offsets[:-1]] = 0  # each mask starts at 0
    return pos - prev, offsets


def rle_encode(masks: torch.Tensor):
    """fastvision::rle_encode on CUDA (or CPU tensors under the interpreter)."""
    return _encode_launch(masks)


@triton.jit
def _decode_kernel(cum, offsets, out, H, W, n_iter, TY: tl.constexpr, TX: tl.constexpr):
    n = tl.program_id(0)
    y = tl.program_id(1) * TY + tl.arange(0, TY)[:, None]
    x = tl.program_id(2) * TX + tl.arange(0, TX)[None, :]
    inside = (y < H) & (x < W)
    hw = H.to(tl.int64) * W
    p = n.to(tl.int64) * hw + x.to(tl.int64) * H + y  # position in the batch's cumulative counts
    first = tl.load(offsets + n)
    lo = tl.zeros((TY, TX), dtype=tl.int64) + first
    hi = tl.zeros((TY, TX), dtype=tl.int64) + tl.load(offsets + n + 1)
    # The first count index k in [first, last) with cum[k] > p: pixel p lies in run k - first.
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        c = tl.load(cum + mid, mask=active & inside, other=0)
        right = active & (c <= p)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    value = ((lo - first) & 1).to(tl.uint8)
    tl.store(out + n.to(tl.int64) * hw + y.to(tl.int64) * W + x, value, mask=inside)


def _decode_launch(counts: torch.Tensor, offsets: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(N, H, W) uint8 from valid counts on the device (each mask sums to H * W)."""
    N = offsets.numel() - 1
    out = torch.empty(N, H, W, dtype=torch.uint8, device=counts.device)
    if N and H and W:
        cum = counts.cumsum(0)  # mask n's counts end at (n + 1) * H * W
        n_iter = max(1, math.ceil(math.log2(counts.numel() + 1)) + 1)
        grid = (N, triton.cdiv(H, TY), triton.cdiv(W, TX))
        _decode_kernel[grid](cum, offsets, out, H, W, n_iter, TY=TY, TX=TX)
    return out


def rle_decode(counts, offsets, sizes, column_major: bool):
    """fastvision::rle_decode on CUDA: checks the batch (one sync), then decodes.
    ``sizes`` may live on the host (no sync for them) or the device."""
    from fastvision.masks.rle import check_device_rles
    H, W = check_device_rles("rle_decode", counts, offsets, sizes)
    out = _decode_launch(counts, offsets, H, W)
    return out.transpose(1, 2).contiguous() if column_major else out
