"""COCO RLE, torch-native and batched: :class:`RLEs` and the ``rle_*`` functions.

A batch of N run-length encoded masks is one :class:`RLEs`: ``counts`` (every
mask's counts concatenated, int64; counts read the mask column-major, as
pycocotools', alternating runs starting with zeros), ``offsets`` (N + 1) and
``sizes`` (N, 2) = (h, w) per mask. The kernels are registered ops
(``torch.ops.fastvision.rle_*``; schemas in ``csrc/registration.cpp``): C++ on
CPU, multi-threaded across masks; :func:`rle_encode` and :func:`rle_decode`
also run on CUDA tensors through Triton kernels (one device-to-host
synchronisation for a whole batch).

Counts are int64, so masks of 2^31 pixels and more work (pycocotools' are
32-bit). Malformed RLEs (counts negative or not summing to h * w, offsets out
of range, strings with bad characters, overflowing or cut-off counts) raise
ValueError naming the mask and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import _extension  # noqa: F401  (loads the op schemas and CPU kernels)

_OPS = torch.ops.fastvision


@dataclass(frozen=True)
class RLEs:
    """N run-length encoded masks: ``counts`` (int64, concatenated), ``offsets``
    (N + 1, int64; mask i owns ``counts[offsets[i]:offsets[i+1]]``) and ``sizes``
    (N, 2) int64 = (h, w) per mask. Produced by :func:`rle_encode` and
    :func:`rle_from_string`; ``RLEs.from_coco`` and ``to_coco`` convert from
    and to pycocotools' dicts."""
    counts: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device) -> RLEs:
        """counts and offsets on `device`; sizes stay on the host (read there without a sync)."""
        return RLEs(self.counts.to(device), self.offsets.to(device), self.sizes)

    def cpu(self) -> RLEs:
        return self.to("cpu")

    def counts_list(self) -> list[list[int]]:
        """Each mask's counts as a Python list (uncompressed RLE)."""
        c, o = self.counts.tolist(), self.offsets.tolist()
        return [c[o[i]:o[i + 1]] for i in range(len(self))]

    def to_coco(self, compressed: bool = True) -> list[dict]:
        """pycocotools' RLE dicts: ``{"size": [h, w], "counts": bytes}`` (or a list of ints)."""
        sizes = self.sizes.tolist()
        counts = rle_to_string(self) if compressed else self.counts_list()
        return [{"size": s, "counts": c} for s, c in zip(sizes, counts)]

    @staticmethod
    def from_coco(objs: Sequence[dict]) -> RLEs:
        """From pycocotools' RLE dicts: compressed counts (str or bytes) or uncompressed (list of ints)."""
        objs = list(objs)
        try:
            sizes = [o["size"] for o in objs]
            counts = [o["counts"] for o in objs]
        except (TypeError, KeyError, IndexError):
            bad = next(i for i, o in enumerate(objs) if not (isinstance(o, dict) and "counts" in o and "size" in o))
            raise ValueError(f"RLE {bad} must be a dict with 'size' and 'counts'; got {_short(objs[bad])}") from None
        sizes = _sizes(sizes)
        if all(type(c) is bytes for c in counts):  # the common case, no per-item work
            return _from_strings(counts, sizes)
        compressed = [isinstance(c, (str, bytes, bytearray)) for c in counts]
        if all(compressed):
            return _from_strings(counts, sizes)
        if not any(compressed):
            return _from_lists(counts, sizes)
        # Mixed: one batch from both kinds, in order.
        parts = [_from_strings([c], sizes[i:i + 1]) if k else _from_lists([c], sizes[i:i + 1])
                 for i, (c, k) in enumerate(zip(counts, compressed))]
        return cat(parts)


def cat(parts: Sequence[RLEs]) -> RLEs:
    """One batch of the RLEs of `parts`, in order."""
    if not parts:
        return _empty()
    counts = torch.cat([p.counts for p in parts])
    lengths = torch.cat([p.offsets.diff() for p in parts])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return RLEs(counts, offsets, torch.cat([p.sizes for p in parts]))


def _empty() -> RLEs:
    return RLEs(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                torch.zeros(0, 2, dtype=torch.long))


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _sizes(sizes) -> torch.Tensor:
    try:
        t = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)  # fast path: lists of two ints
        if t.shape[0] == len(sizes):
            return t
    except (TypeError, ValueError, RuntimeError, OverflowError):
        pass
    try:
        t = torch.tensor([[int(s[0]), int(s[1])] for s in sizes], dtype=torch.long).reshape(-1, 2)
        if any(len(s) != 2 for s in sizes):
            raise ValueError
    except (TypeError, IndexError, ValueError, OverflowError):
        raise ValueError(f"every RLE's 'size' must be [h, w] (two ints); got {_short(list(sizes))}") from None
    return t


def _from_strings(strings, sizes: torch.Tensor) -> RLEs:
    if all(type(s) is bytes for s in strings):
        encoded = strings
    else:
        encoded = _as_bytes(strings)
    lengths = torch.tensor([0] + [len(s) for s in encoded], dtype=torch.long)
    chars = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if lengths.any() \
        else torch.zeros(0, dtype=torch.uint8)
    counts, offsets = _OPS.rle_from_string(chars, lengths.cumsum(0), sizes)
    return RLEs(counts, offsets, sizes)


def _as_bytes(strings) -> list[bytes]:
    encoded = []
    for i, s in enumerate(strings):
        if isinstance(s, str):
            try:
                s = s.encode("ascii")
            except UnicodeEncodeError:
                raise ValueError(f"RLE {i}: compressed counts must be ASCII; got {_short(s)}") from None
        elif not isinstance(s, (bytes, bytearray)):
            raise TypeError(f"RLE {i}: compressed counts must be str or bytes; got {type(s).__name__}")
        encoded.append(bytes(s))
    return encoded


def _from_lists(lists, sizes: torch.Tensor) -> RLEs:
    flat, lengths = [], [0]
    for i, c in enumerate(lists):
        try:
            c = [int(v) for v in (c.tolist() if hasattr(c, "tolist") else c)]
        except (TypeError, ValueError):
            raise ValueError(f"RLE {i}: uncompressed counts must be a list of ints; got {_short(c)}") from None
        flat += c
        lengths.append(len(c))
    try:
        counts = torch.tensor(flat, dtype=torch.long)
    except RuntimeError:  # beyond int64
        raise ValueError("RLE counts must fit in int64") from None
    offsets = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    _OPS.rle_area(counts, offsets, sizes)  # validates every mask (counts >= 0, sum == h * w)
    return RLEs(counts, offsets, sizes)


def as_rles(rles) -> RLEs:
    """`rles` as an :class:`RLEs` (RLEs, one pycocotools dict, or a list of them)."""
    if isinstance(rles, RLEs):
        return rles
    if isinstance(rles, dict):
        return RLEs.from_coco([rles])
    if isinstance(rles, (list, tuple)):
        return RLEs.from_coco(rles)
    raise TypeError(f"rles must be an RLEs, a pycocotools RLE dict or a list of them; got {type(rles).__name__}")


def _host(rles: RLEs) -> RLEs:
    return rles if rles.device.type == "cpu" else rles.cpu()


# --------------------------------------------------------------------------
# Public functions


def rle_encode(masks: torch.Tensor) -> RLEs:
    """Run-length encodes masks (N, H, W) (bool or uint8; nonzero is foreground) on CPU or CUDA.

    Row-major (contiguous) and column-major (e.g. a Fortran numpy array's
    memory) inputs are read in place; other layouts are copied first. On CUDA
    the counts stay on the device and the whole batch costs one
    device-to-host synchronisation (to size the output).

    >>> rles = rle_encode(torch.zeros(2, 4, 5, dtype=torch.bool))
    >>> rles.counts_list()
    [[20], [20]]
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor; got {type(masks).__name__}")
    if masks.dim() != 3:
        raise ValueError(f"masks must be a 3-D tensor (N, H, W); got shape {tuple(masks.shape)}")
    if masks.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"masks must be bool or uint8; got {str(masks.dtype).replace('torch.', '')}")
    if not (masks.is_contiguous() or masks.transpose(1, 2).is_contiguous() and masks.stride(0) == masks[0].numel()):
        masks = masks.contiguous()
    counts, offsets = _OPS.rle_encode(masks)
    n, h, w = masks.shape
    sizes = torch.tensor([[h, w]], dtype=torch.long).expand(n, 2).contiguous()
    return RLEs(counts, offsets, sizes)


def rle_decode(rles, device=None) -> torch.Tensor:
    """Masks (N, H, W) bool from RLEs (one size for the whole batch), on `device`
    (default: the RLEs' device; CPU for pycocotools dicts)."""
    rles = as_rles(rles)
    device = torch.device(device) if device is not None else rles.device
    if len(rles) == 0:
        return torch.zeros(0, 0, 0, dtype=torch.bool, device=device)
    if device.type == "cuda" and rles.device.type == "cpu":
        # Checked here by the C++ (no device sync), decoded there by the Triton kernel.
        from ..triton.masks import _decode_launch
        _OPS.rle_area(rles.counts, rles.offsets, rles.sizes)
        h, w = _one_size("rle_decode", rles.sizes)
        dev = rles.to(device)
        return _decode_launch(dev.counts, dev.offsets, h, w).view(torch.bool)
    rles = rles.to(device) if device.type == "cuda" else _host(rles)
    return _OPS.rle_decode(rles.counts, rles.offsets, rles.sizes, False).to(device).view(torch.bool)


def rle_area(rles) -> torch.Tensor:
    """Foreground pixels per mask, int64 (N,)."""
    rles = _host(as_rles(rles))
    return _OPS.rle_area(rles.counts, rles.offsets, rles.sizes)


def rle_to_bbox(rles) -> torch.Tensor:
    """[x, y, w, h] of each mask's foreground, float64 (N, 4) (pycocotools' toBbox)."""
    rles = _host(as_rles(rles))
    return _OPS.rle_to_bbox(rles.counts, rles.offsets, rles.sizes)


def rle_iou(dt, gt, iscrowd=None) -> torch.Tensor:
    """IoU (D, G) float64 of every detection with every ground truth, computed on
    the runs (masks are never expanded). ``iscrowd`` (G,) bools: a crowd ground
    truth's IoU is intersection / area of the detection (pycocotools' rule)."""
    dt, gt = _host(as_rles(dt)), _host(as_rles(gt))
    crowd = torch.zeros(len(gt), dtype=torch.bool) if iscrowd is None else \
        torch.as_tensor(iscrowd).to("cpu", torch.bool).reshape(-1)
    if crowd.numel() != len(gt):
        raise ValueError(f"iscrowd must have one flag per ground truth ({len(gt)}); got {crowd.numel()}")
    return _OPS.rle_iou(dt.counts, dt.offsets, dt.sizes, gt.counts, gt.offsets, gt.sizes, crowd)


def rle_merge(rles, intersect: bool = False) -> RLEs:
    """The union (or intersection) of the masks as one RLE (pycocotools' merge)."""
    rles = _host(as_rles(rles))
    counts = _OPS.rle_merge(rles.counts, rles.offsets, rles.sizes, bool(intersect))
    sizes = rles.sizes[:1] if len(rles) else torch.zeros(1, 2, dtype=torch.long)
    return RLEs(counts, torch.tensor([0, counts.numel()]), sizes.contiguous())


def rle_to_string(rles) -> list[bytes]:
    """pycocotools' compressed counts (bytes) of each mask."""
    rles = _host(as_rles(rles))
    chars, offsets = _OPS.rle_to_string(rles.counts, rles.offsets, rles.sizes)
    data, o = chars.numpy().tobytes(), offsets.tolist()
    return [data[o[i]:o[i + 1]] for i in range(len(o) - 1)]


def rle_from_string(strings, h: int | None = None, w: int | None = None, sizes=None) -> RLEs:
    """RLEs from pycocotools' compressed counts (str or bytes), all h x w, or one
    (h, w) per string in `sizes`."""
    if isinstance(strings, (str, bytes)):
        strings = [strings]
    strings = list(strings)
    if sizes is None:
        if h is None or w is None:
            raise TypeError("rle_from_string needs h and w, or sizes")
        sizes = [(h, w)] * len(strings)
    return _from_strings(strings, _sizes(sizes))


def rle_from_polygons(polygons, h: int, w: int) -> RLEs:
    """One RLE per polygon [x0, y0, x1, y1, ...], rasterised as pycocotools' frPoly."""
    import numpy as np

    arrays = [np.asarray(p, dtype=np.float64).reshape(-1) for p in polygons]
    lengths = torch.tensor([0] + [a.size for a in arrays], dtype=torch.long)
    xy = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.zeros(0, dtype=torch.float64)
    counts, offsets = _OPS.rle_from_polygons(xy, lengths.cumsum(0), int(h), int(w))
    sizes = torch.tensor([[int(h), int(w)]], dtype=torch.long).expand(len(arrays), 2).contiguous()
    return RLEs(counts, offsets, sizes)


# --------------------------------------------------------------------------
# CUDA: the Triton kernels (fastvision/triton/masks.py) as the ops' CUDA kernels


def _one_size(op: str, sizes: torch.Tensor) -> tuple[int, int]:
    s = sizes.tolist()
    if any(x != s[0] for x in s):
        raise ValueError(f"fastvision.{op}: every RLE of a batch must have one size; got {sorted(set(map(tuple, s)))}")
    return tuple(s[0]) if s else (0, 0)


def check_device_rles(op: str, counts, offsets, sizes) -> tuple[int, int]:
    """Checks a batch whose counts and offsets are on a GPU, as the C++ checks a
    host one (ValueError "fastvision.<op>: ..."), reading one small tensor back;
    returns the batch's (h, w). Indices are clamped before use: nothing is read
    out of bounds even when the check fails."""
    for name, t in (("counts", counts), ("offsets", offsets)):
        if t.dtype != torch.int64 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"fastvision.{op}: {name} must be a contiguous 1-D int64 tensor; got "
                             f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}")
    if offsets.device != counts.device:
        raise ValueError(f"fastvision.{op}: offsets must be on the device of counts ({counts.device}); "
                         f"got {offsets.device}")
    if offsets.numel() < 1:
        raise ValueError(f"fastvision.{op}: offsets must have N + 1 >= 1 entries; got none")
    n = offsets.numel() - 1
    if sizes.dtype != torch.int64 or tuple(sizes.shape) != (n, 2):
        raise ValueError(f"fastvision.{op}: sizes must be int64 of shape (N, 2) = ({n}, 2); got "
                         f"{str(sizes.dtype).replace('torch.', '')} of shape {tuple(sizes.shape)}")
    h, w = _one_size(op, sizes.cpu())
    if h < 0 or w < 0:
        raise ValueError(f"fastvision.{op}: sizes must be non-negative; got ({h}, {w})")
    L = counts.numel()
    o = offsets.clamp(0, L)
    cum = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    sums = cum[o[1:]] - cum[o[:-1]]
    false = torch.zeros((), dtype=torch.bool, device=counts.device)
    bad = torch.stack([offsets[0] != 0, (offsets.diff() < 0).any() if n else false, offsets[-1] != L,
                       (counts < 0).any() if L else false, (sums != h * w).any() if n else false]).tolist()
    for failed, what in zip(bad, ("offsets[0] must be 0", "offsets must be non-decreasing",
                                  f"offsets[N] must be the length of counts ({L})", "counts must be non-negative",
                                  f"every RLE's counts must sum to h * w = {h} * {w}")):
        if failed:
            raise ValueError(f"fastvision.{op}: {what}")
    return h, w


def _triton_encode(masks):
    if masks.dtype not in (torch.uint8, torch.bool) or masks.dim() != 3:
        raise ValueError(f"fastvision.rle_encode: masks must be a (N, H, W) uint8 or bool tensor; got "
                         f"{str(masks.dtype).replace('torch.', '')} of shape {tuple(masks.shape)}")
    from ..triton.masks import rle_encode as encode
    with torch.cuda.device(masks.device):
        return encode(masks)


def _triton_decode(counts, offsets, sizes, column_major):
    from ..triton.masks import rle_decode as decode
    with torch.cuda.device(counts.device):
        return decode(counts, offsets, sizes, column_major)


if _extension.triton_available():
    torch.library.register_kernel("fastvision::rle_encode", "cuda", _triton_encode)
    torch.library.register_kernel("fastvision::rle_decode", "cuda", _triton_decode)


# --------------------------------------------------------------------------
# Fake kernels (torch.compile, meta tensors): data-dependent lengths are unbacked sizes.


def _dynamic(name_hint: str):
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.register_fake("fastvision::rle_encode")
def _encode_fake(masks):
    total = _dynamic("counts")
    return masks.new_empty(total, dtype=torch.long), masks.new_empty(masks.shape[0] + 1, dtype=torch.long)


@torch.library.register_fake("fastvision::rle_decode")
def _decode_fake(counts, offsets, sizes, column_major):
    n = offsets.shape[0] - 1
    h, w = _dynamic("h"), _dynamic("w")
    return counts.new_empty((n, w, h) if column_major else (n, h, w), dtype=torch.uint8)


@torch.library.register_fake("fastvision::rle_to_string")
def _to_string_fake(counts, offsets, sizes):
    return counts.new_empty(_dynamic("chars"), dtype=torch.uint8), offsets.new_empty(offsets.shape)


@torch.library.register_fake("fastvision::rle_from_string")
def _from_string_fake(chars, char_offsets, sizes):
    return chars.new_empty(_dynamic("counts"), dtype=torch.long), char_offsets.new_empty(char_offsets.shape)


@torch.library.register_fake("fastvision::rle_area")
def _area_fake(counts, offsets, sizes):
    return counts.new_empty(offsets.shape[0] - 1)


@torch.library.register_fake("fastvision::rle_to_bbox")
def _bbox_fake(counts, offsets, sizes):
    return counts.new_empty((offsets.shape[0] - 1, 4), dtype=torch.float64)


@torch.library.register_fake("fastvision::rle_iou")
def _iou_fake(dt_counts, dt_offsets, dt_sizes, gt_counts, gt_offsets, gt_sizes, iscrowd):
    return dt_counts.new_empty((dt_offsets.shape[0] - 1, gt_offsets.shape[0] - 1), dtype=torch.float64)


@torch.library.register_fake("fastvision::rle_merge")
def _merge_fake(counts, offsets, sizes, intersect):
    return counts.new_empty(_dynamic("counts"))


@torch.library.register_fake("fastvision::rle_from_polygons")
def _polygons_fake(xy, poly_offsets, h, w):
    return xy.new_empty(_dynamic("counts"), dtype=torch.long), poly_offsets.new_empty(poly_offsets.shape)
