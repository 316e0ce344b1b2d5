"""A drop-in for ``pycocotools.mask``: encode, decode, area, toBbox, merge, iou, frPyObjects.

Same arguments, return types and bytes as pycocotools 2.0 (checked against it
in tests/test_masks.py), with these differences, all where pycocotools fails
or misbehaves:

* ``encode`` takes C-order or Fortran arrays, uint8 or bool (pycocotools
  raises "ndarray is not Fortran contiguous" for C-order arrays); nonzero is
  foreground (pycocotools starts a new run at every change of value).
* malformed RLEs (counts not summing to h * w, negative counts, bad,
  overflowing or truncated strings) and masks of different sizes where one
  size is needed (decode, merge, iou) raise ValueError; pycocotools returns
  garbage, -1 or reads out of bounds. ``decode`` also takes uncompressed RLEs.
* counts are 64-bit, so masks of 2^32 pixels and more work.
* ``toBbox`` of an RLE whose foreground runs are all empty is [0, 0, 0, 0]
  (pycocotools' 2.0.11 toBbox wraps around in unsigned arithmetic there).
"""

from __future__ import annotations

import numpy as np
import torch

from .._extension import C as _C
from .rle import RLEs, _from_lists, _OPS, _sizes, as_rles, rle_from_polygons, rle_to_string


def _dicts(rles: RLEs) -> list[dict]:
    sizes = rles.sizes.tolist()
    return [{"size": s, "counts": c} for s, c in zip(sizes, rle_to_string(rles))]


def encode(bimask):
    """RLE dicts of masks (h, w, n) (a list), or of one mask (h, w) (one dict)."""
    arr = np.asarray(bimask)
    if arr.ndim not in (2, 3):
        raise ValueError(f"bimask must be (h, w) or (h, w, n); got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.bool_):
        raise TypeError(f"bimask must be uint8 or bool; got {arr.dtype}")
    single = arr.ndim == 2
    if single:
        arr = arr[:, :, None]
    h, w, n = arr.shape
    # (h, w, n) -> (n, h, w): a Fortran array becomes column-major masks, read in place.
    masks = torch.from_numpy(arr if arr.strides[0] >= 0 and arr.strides[1] >= 0 and arr.strides[2] >= 0
                             else arr.copy()).permute(2, 0, 1)
    if not (masks.is_contiguous() or masks.stride(1) == 1 and masks.stride(2) == h and masks.stride(0) == h * w):
        masks = masks.contiguous()
    counts, offsets = _OPS.rle_encode(masks)
    sizes = torch.tensor([[h, w]], dtype=torch.long).expand(n, 2).contiguous()
    objs = _dicts(RLEs(counts, offsets, sizes))
    return objs[0] if single else objs


def decode(rleObjs):
    """Masks (h, w, n) uint8, Fortran order, from a list of RLEs; (h, w) from one RLE."""
    single = not isinstance(rleObjs, list)
    rles = as_rles([rleObjs] if single else rleObjs)
    if len(rles) == 0:
        raise ValueError("decode needs at least one RLE")
    h, w = rles.sizes[0].tolist()
    out = _OPS.rle_decode(rles.counts, rles.offsets, rles.sizes, True)  # (n, w, h): Fortran (h, w, n) memory
    masks = out.numpy().transpose(2, 1, 0)
    return masks[:, :, 0] if single else masks


def area(rleObjs):
    """Foreground pixels: uint32 array for a list of RLEs, one uint32 for one RLE."""
    single = not isinstance(rleObjs, list)
    rles = as_rles([rleObjs] if single else rleObjs)
    a = _OPS.rle_area(rles.counts, rles.offsets, rles.sizes).numpy()
    a = a.astype(np.uint32) if a.size == 0 or a.max() < 2**32 else a  # 64-bit beyond pycocotools' range
    return a[0] if single else a


def toBbox(rleObjs):
    """[x, y, w, h] float64: (n, 4) for a list of RLEs, (4,) for one RLE."""
    single = not isinstance(rleObjs, list)
    rles = as_rles([rleObjs] if single else rleObjs)
    bb = _OPS.rle_to_bbox(rles.counts, rles.offsets, rles.sizes).numpy()
    return bb[0] if single else bb


def merge(rleObjs, intersect=0):
    """One RLE dict: the union (intersect=False) or intersection of the RLEs."""
    rles = as_rles(rleObjs)
    if len(rles) == 0:
        return {"size": [0, 0], "counts": b""}
    counts = _OPS.rle_merge(rles.counts, rles.offsets, rles.sizes, bool(intersect))
    merged = RLEs(counts, torch.tensor([0, counts.numel()]), rles.sizes[:1].contiguous())
    return _dicts(merged)[0]


def _boxes_or_rles(objs, name: str):
    """pycocotools' iou input: (N, 4) boxes (ndarray or list of 4-lists) or a list of RLE dicts."""
    if isinstance(objs, np.ndarray):
        if objs.size == 0:
            return "empty", None
        if objs.ndim != 2 or objs.shape[1] != 4:
            raise ValueError(f"{name}: a numpy array must be (N, 4) boxes [x, y, w, h]; got shape {objs.shape}")
        return "boxes", torch.from_numpy(objs.astype(np.float64))
    if isinstance(objs, list):
        if len(objs) == 0:
            return "empty", None
        if all(isinstance(o, dict) for o in objs):
            return "rles", as_rles(objs)
        if all(isinstance(o, (list, np.ndarray)) and len(o) == 4 for o in objs):
            return "boxes", torch.tensor(np.asarray(objs, dtype=np.float64))
        raise ValueError(f"{name}: a list must hold boxes [x, y, w, h] or RLE dicts")
    raise TypeError(f"{name} must be a list of RLEs, a list of boxes or an (N, 4) numpy array; "
                    f"got {type(objs).__name__}")


def box_iou(dt: torch.Tensor, gt: torch.Tensor, iscrowd: torch.Tensor) -> torch.Tensor:
    """pycocotools' bbIou of [x, y, w, h] boxes, (D, G) float64 (same arithmetic, so the same bits)."""
    D, G = dt[:, None, :], gt[None, :, :]
    w = torch.minimum(D[..., 2] + D[..., 0], G[..., 2] + G[..., 0]) - torch.maximum(D[..., 0], G[..., 0])
    h = torch.minimum(D[..., 3] + D[..., 1], G[..., 3] + G[..., 1]) - torch.maximum(D[..., 1], G[..., 1])
    inter = w * h
    da, ga = D[..., 2] * D[..., 3], G[..., 2] * G[..., 3]
    union = torch.where(iscrowd[None, :], da, da + ga - inter)
    return torch.where((w > 0) & (h > 0), inter / union, torch.zeros_like(inter))


def iou(dt, gt, pyiscrowd):
    """IoU (D, G) float64 of detections and ground truths: both RLE lists or both boxes.
    ``pyiscrowd``: one flag per ground truth (crowd: intersection / detection area)."""
    if type(dt) is list and type(gt) is list and dt and gt and type(dt[0]) is dict and pyiscrowd is not None:
        # pycocotools' RLE dicts: one C++ call reads the dicts and parses their strings (the
        # general path below joins them into tensors first); None if any is of another form.
        crowd = np.asarray(pyiscrowd, dtype=np.uint8).reshape(-1)
        if crowd.size != len(gt):
            raise ValueError(f"pyiscrowd must have one flag per ground truth ({len(gt)}); got {crowd.size}")
        out = _C.rle_iou_coco(dt, gt, crowd.tobytes())
        if out is not None:
            return np.frombuffer(out, dtype=np.float64).reshape(len(dt), len(gt))
    kd, d = _boxes_or_rles(dt, "dt")
    kg, g = _boxes_or_rles(gt, "gt")
    if kd == "empty" or kg == "empty":
        return []
    if kd != kg:
        raise ValueError("dt and gt must be of one kind: both RLEs or both boxes")
    n = len(g)
    crowd = torch.as_tensor(np.asarray(pyiscrowd, dtype=np.uint8).reshape(-1)).bool() if pyiscrowd is not None \
        else torch.zeros(n, dtype=torch.bool)
    if crowd.numel() != n:
        raise ValueError(f"pyiscrowd must have one flag per ground truth ({n}); got {crowd.numel()}")
    if kd == "boxes":
        return box_iou(d, g, crowd).numpy()
    return _OPS.rle_iou(d.counts, d.offsets, d.sizes, g.counts, g.offsets, g.sizes, crowd).numpy()


def _boxes_to_polygons(bb: np.ndarray) -> list[np.ndarray]:
    # pycocotools' rleFrBbox: the box as the polygon (xs,ys) (xs,ye) (xe,ye) (xe,ys).
    xs, ys = bb[:, 0], bb[:, 1]
    xe, ye = xs + bb[:, 2], ys + bb[:, 3]
    return list(np.stack([xs, ys, xs, ye, xe, ye, xe, ys], axis=1))


def _fr_boxes(bb, h, w):
    bb = np.asarray(bb, dtype=np.float64)
    if bb.ndim != 2 or bb.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) [x, y, w, h]; got shape {bb.shape}")
    return _dicts(rle_from_polygons(_boxes_to_polygons(bb), h, w))


def _fr_uncompressed(objs):
    sizes = _sizes([o["size"] for o in objs])
    return _dicts(_from_lists([o["counts"] for o in objs], sizes))


def frPyObjects(pyobj, h, w):
    """RLE dicts from polygons, [x, y, w, h] boxes or uncompressed RLEs (lists, or
    one object for one dict), as pycocotools: polygons rasterised the same way,
    an uncompressed RLE keeps its own size."""
    if isinstance(pyobj, np.ndarray):
        return _fr_boxes(pyobj, h, w)
    if isinstance(pyobj, list) and pyobj:
        first = pyobj[0]
        if isinstance(first, dict):
            if "counts" in first and "size" in first:
                return _fr_uncompressed(pyobj)
        elif hasattr(first, "__len__") and len(first) == 4:
            return _fr_boxes(pyobj, h, w)
        elif hasattr(first, "__len__") and len(first) > 4:
            return _dicts(rle_from_polygons(pyobj, h, w))
        elif len(pyobj) == 4:
            return _fr_boxes([pyobj], h, w)[0]
        elif len(pyobj) > 4:
            return _dicts(rle_from_polygons([pyobj], h, w))[0]
    elif isinstance(pyobj, dict) and "counts" in pyobj and "size" in pyobj:
        return _fr_uncompressed([pyobj])[0]
    raise TypeError("input type is not supported: polygons, [x, y, w, h] boxes or uncompressed RLEs "
                    f"(a list of them, or one); got {_describe(pyobj)}")


def _describe(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."
