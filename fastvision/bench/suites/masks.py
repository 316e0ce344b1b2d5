"""Benchmarks of the mask codecs (forward only: not differentiable).

COCO RLE, 100 masks of 480 x 640 and of 1024 x 1024 (random discs, as
instance masks look): ``rle_encode`` / ``rle_decode`` (fastvision's
pycocotools drop-in on pycocotools' own input, a Fortran (h, w, n) uint8
array, and its output), ``rle_iou`` (100 x 100 RLEs). The reference is
pycocotools where it installs (``pip install pycocotools``), else fastvision's
numpy reference. On CUDA, ``rle_encode`` is timed against segment-anything's
``mask_to_rle_pytorch`` approach (diff + nonzero + a per-mask loop, one
device-to-host copy per mask) on the same GPU.

R-RLE (Text4Seg), 24 x 24 and 64 x 64 grids: ``rrle_encode`` / ``rrle_decode``
against a Python implementation of Text4Seg's ``encode_mask`` / ``decode_mask``
(+ its ``translate_sequence`` label lookup) in fastvision.reference.masks.
"""

from __future__ import annotations

import numpy as np
import torch

import fastvision.masks as fm
from fastvision.reference.masks import rle_counts, text4seg_decode_mask, text4seg_encode_mask

from ..core import Case, Impl, Inputs, Suite, register

RLE_CASES = (
    Case("100x480x640", dict(n=100, h=480, w=640), quick=True),
    Case("100x1024x1024", dict(n=100, h=1024, w=1024), quick=True),
)
IOU_CASES = (Case("100x100_480x640", dict(n=100, h=480, w=640), quick=True, devices=("cpu",)),)
RRLE_CASES = (
    Case("grid24", dict(g=24, k=3, b=1), quick=True, devices=("cpu",)),
    Case("grid64", dict(g=64, k=5, b=1), quick=True, devices=("cpu",)),
    Case("grid24_x256", dict(g=24, k=3, b=256), quick=True, devices=("cpu",)),
    Case("grid64_x256", dict(g=64, k=5, b=256), quick=True, devices=("cpu",)),
)
NAMES = ["others", "person", "dog", "traffic light", "cat"]


def _pycocotools():
    try:
        import pycocotools.mask as mask
        return mask
    except ImportError:
        return None


def discs(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, n) uint8 Fortran array of random discs (instance-mask-like)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, n), np.uint8, order="F")
    yy, xx = np.ogrid[:h, :w]
    for i in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, max(9, min(h, w) // 3))
        out[:, :, i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return out


def rle_inputs(shape: dict, device: str, dtype) -> tuple[Inputs, None]:
    fortran = discs(shape["n"], shape["h"], shape["w"])
    masks = torch.from_numpy(np.ascontiguousarray(fortran.transpose(2, 0, 1))).to(device)
    return {"fortran": fortran, "masks": masks, "rles": fm.encode(fortran)}, None


def _numpy_encode(x: Inputs):
    return [rle_counts(m) for m in x["fortran"].transpose(2, 0, 1)]


def sam_mask_to_rle(masks: torch.Tensor) -> list[dict]:
    """segment-anything's mask_to_rle_pytorch approach: transitions in column-major
    order by diff + nonzero, then one device-to-host copy per mask."""
    b, h, w = masks.shape
    flat = masks.permute(0, 2, 1).flatten(1)
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero()
    out = []
    for i in range(b):
        idx = change[change[:, 0] == i, 1]
        idx = torch.cat([idx.new_zeros(1), idx + 1, idx.new_full((1,), h * w)])
        runs = idx[1:] - idx[:-1]
        counts = [] if flat[i, 0] == 0 else [0]
        counts.extend(runs.cpu().tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


def _counts(out) -> list[list[int]]:
    """Any encode output (RLEs, pycocotools dicts, SAM's dicts of lists) as counts lists."""
    if isinstance(out, fm.RLEs):
        return out.counts_list()
    if out and isinstance(out[0], dict) and isinstance(out[0]["counts"], list):
        return [o["counts"] for o in out]
    if out and isinstance(out[0], dict):
        return fm.RLEs.from_coco(out).counts_list()
    return [list(c) for c in out]  # the numpy reference


def _masks(out) -> torch.Tensor:
    """Any decode output ((h, w, n) Fortran uint8 or (n, h, w) tensor) as (n, h, w) bool."""
    if isinstance(out, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).bool()
    return out.cpu().bool()


def _labels(out) -> torch.Tensor:
    """Any R-RLE decode output (fastvision's tuple, the reference's label lists) as int64 labels."""
    if isinstance(out, tuple):
        return out[0].flatten()
    flat = [v for o in out for v in o] if out and isinstance(out[0], list) else out
    return torch.tensor(flat, dtype=torch.long)


def _text_bytes(out) -> torch.Tensor:
    """R-RLE text (or texts) as a byte tensor."""
    text = "\x00".join(out) if isinstance(out, list) else out
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _encode_suite() -> Suite:
    def reference(shape, device):
        if device == "cuda":
            return Impl(lambda x: sam_mask_to_rle(x["masks"].bool()),
                        note="segment-anything's mask_to_rle_pytorch approach on the GPU: diff + nonzero + "
                             "a per-mask loop with one .cpu() per mask; counts as Python lists")
        coco = _pycocotools()
        if coco is None:
            return Impl(_numpy_encode, note="fastvision.reference.masks.rle_counts (numpy; pycocotools "
                                            "not installed)")
        return Impl(lambda x: coco.encode(x["fortran"]),
                    note="pycocotools.mask.encode on a Fortran (h, w, n) uint8 array -> compressed RLE dicts")

    def fastvision(backend):
        if backend == "cpu":
            return Impl(lambda x: fm.encode(x["fortran"]),
                        note="fastvision.masks.encode (the pycocotools drop-in): same input, same dicts")
        if backend == "triton":
            return Impl(lambda x: fm.rle_encode(x["masks"]).cpu(),
                        note="fastvision.masks.rle_encode on CUDA (Triton; one sync to size the output) + "
                             "the counts copied to the host")
        return Impl(None, skip="no CUDA C++ kernel: Triton is the codecs' CUDA path")

    def baselines(shape, device):
        if device != "cpu":
            return {}
        return {"rle_encode (torch, row-major)": Impl(
            lambda x: fm.rle_encode(x["masks"]),
            note="fastvision.masks.rle_encode of the (n, h, w) row-major tensor (counts, uncompressed)")}

    return Suite("rle_encode", None, RLE_CASES, rle_inputs, lambda s: {}, fastvision, reference, baselines,
                 tiny=dict(n=3, h=12, w=9), config="100 random discs per case; forward only",
                 forward_only=True, family="masks", canonical=_counts)


def _decode_suite() -> Suite:
    def reference(shape, device):
        coco = _pycocotools()
        if coco is None:
            return Impl(lambda x: fm.rle_decode(x["rles"]), note="fastvision.masks.rle_decode (pycocotools "
                                                                  "not installed)")
        if device == "cuda":
            return Impl(lambda x: torch.from_numpy(coco.decode(x["rles"])).to(device),
                        note="pycocotools.mask.decode, then the masks copied to the GPU")
        return Impl(lambda x: coco.decode(x["rles"]),
                    note="pycocotools.mask.decode of compressed RLE dicts -> Fortran (h, w, n) uint8")

    def fastvision(backend):
        if backend == "cpu":
            return Impl(lambda x: fm.decode(x["rles"]), note="fastvision.masks.decode (the pycocotools drop-in)")
        if backend == "triton":
            return Impl(lambda x: fm.rle_decode(x["rles"], device="cuda"),
                        note="fastvision.masks.rle_decode(device='cuda'): strings parsed on the host, counts "
                             "copied over, masks (n, h, w) written by a Triton kernel")
        return Impl(None, skip="no CUDA C++ kernel: Triton is the codecs' CUDA path")

    def baselines(shape, device):
        if device != "cpu":
            return {}
        return {"rle_decode (torch, row-major)": Impl(
            lambda x: fm.rle_decode(x["rles"]), note="fastvision.masks.rle_decode -> (n, h, w) bool tensor")}

    return Suite("rle_decode", None, RLE_CASES, rle_inputs, lambda s: {}, fastvision, reference, baselines,
                 tiny=dict(n=3, h=12, w=9), config="100 random discs per case; forward only",
                 forward_only=True, family="masks", canonical=_masks)


def _iou_suite() -> Suite:
    def reference(shape, device):
        coco = _pycocotools()
        if coco is None:
            return Impl(lambda x: fm.iou(x["rles"], x["rles"], [0] * len(x["rles"])),
                        note="fastvision.masks.iou (pycocotools not installed)")
        return Impl(lambda x: coco.iou(x["rles"], x["rles"], [0] * len(x["rles"])),
                    note="pycocotools.mask.iou of compressed RLE dicts (its strings parsed in the call)")

    def fastvision(backend):
        if backend == "cpu":
            return Impl(lambda x: fm.iou(x["rles"], x["rles"], [0] * len(x["rles"])),
                        note="fastvision.masks.iou (drop-in; one C++ call reads the dicts and parses their "
                             "strings, IoU per column on the runs)")
        return Impl(None, skip="CPU only")

    return Suite("rle_iou", None, IOU_CASES, rle_inputs, lambda s: {}, fastvision, reference,
                 tiny=dict(n=3, h=12, w=9), config="100 x 100 RLE masks (random discs); forward only",
                 forward_only=True, family="masks", canonical=lambda out: torch.as_tensor(out))


def _grid(g: int, k: int, rng) -> np.ndarray:
    labels = np.zeros((g, g), np.int64)
    for c in range(1, k):  # a few rectangles per class, as a segmentation grid looks
        for _ in range(2):
            y, x = rng.integers(0, g, 2)
            labels[y:y + rng.integers(2, max(3, g // 2)), x:x + rng.integers(2, max(3, g // 2))] = c
    return labels


def rrle_inputs(shape: dict, device: str, dtype) -> tuple[Inputs, None]:
    """b grids of g x g (b = 1: one grid per call; else a batch, the data-builder workload)."""
    g, k, b = shape["g"], shape["k"], shape["b"]
    rng = np.random.default_rng(0)
    labels = np.stack([_grid(g, k, rng) for _ in range(b)])
    names = NAMES[:k]
    rows = [[[names[v] for v in r] for r in grid.tolist()] for grid in labels]
    texts = [text4seg_encode_mask(r) for r in rows]
    if b == 1:
        return {"labels": torch.from_numpy(labels[0]), "rows": rows[0], "names": names, "g": g, "b": b,
                "text": texts[0]}, None
    return {"labels": torch.from_numpy(labels), "rows": rows, "names": names, "g": g, "b": b, "text": texts}, None


def _translate(text: str, names: list[str]) -> list[int]:
    """Text4Seg's decode_mask + translate_sequence: the text to label ids."""
    index = {n: i for i, n in enumerate(names)}
    return [index.get(v, 0) for v in text4seg_decode_mask(text)]


def _rrle_suite(op: str) -> Suite:
    def reference(shape, device):
        if op == "rrle_encode":
            return Impl(lambda x: text4seg_encode_mask(x["rows"]) if x["b"] == 1 else
                        [text4seg_encode_mask(r) for r in x["rows"]],
                        note="Text4Seg's encode_mask (Python, fastvision.reference.masks) on the rows of label "
                             "strings it is given in Text4Seg's data builders (a loop over a batch)")
        return Impl(lambda x: _translate(x["text"], x["names"]) if x["b"] == 1 else
                    [_translate(t, x["names"]) for t in x["text"]],
                    note="Text4Seg's decode_mask + translate_sequence (Python string splitting per token; "
                         "a loop over a batch)")

    def fastvision(backend):
        if backend != "cpu":
            return Impl(None, skip="CPU only (text in, text out)")
        if op == "rrle_encode":
            return Impl(lambda x: fm.rrle_encode(x["labels"], x["names"]),
                        note="fastvision.masks.rrle_encode(labels (g, g) or (b, g, g) int64, names) -> str or "
                             "list of str (one call per batch)")
        return Impl(lambda x: fm.rrle_decode(x["text"], x["g"], x["g"], x["names"]),
                    note="fastvision.masks.rrle_decode (tolerant, with its report) of a text or a list of "
                         "texts (one call per batch) -> (g, g) or (b, g, g) int64")

    def baselines(shape, device):
        if op != "rrle_encode" or device != "cpu":
            return {}
        if shape["b"] != 1:
            return {}
        return {"rrle_encode (nested list of strings)": Impl(
            lambda x: fm.rrle_encode(x["rows"]),
            note="fastvision.masks.rrle_encode on Text4Seg's own input (rows of strings, interned in Python)")}

    return Suite(op, None, RRLE_CASES, rrle_inputs, lambda s: {}, fastvision, reference, baselines,
                 tiny=dict(g=4, k=2), config="Text4Seg's separators; b grids per call; forward only", forward_only=True,
                 family="masks", canonical=_text_bytes if op == "rrle_encode" else _labels)


register(_encode_suite())
register(_decode_suite())
register(_iou_suite())
register(_rrle_suite("rrle_encode"))
register(_rrle_suite("rrle_decode"))
