"""Mask codecs: COCO RLE (a drop-in for ``pycocotools.mask`` and a torch-native
batched API) and Text4Seg's R-RLE (semantic descriptors).

pycocotools-compatible: :func:`encode`, :func:`decode`, :func:`area`,
:func:`toBbox`, :func:`merge`, :func:`iou`, :func:`frPyObjects`.
Torch-native: :class:`RLEs`, :func:`rle_encode`, :func:`rle_decode`,
:func:`rle_area`, :func:`rle_to_bbox`, :func:`rle_iou`, :func:`rle_merge`,
:func:`rle_to_string`, :func:`rle_from_string`, :func:`rle_from_polygons`.
"""

from .coco import area, decode, encode, frPyObjects, iou, merge, toBbox
from .rle import (RLEs, rle_area, rle_decode, rle_encode, rle_from_polygons, rle_from_string, rle_iou, rle_merge,
                  rle_to_bbox, rle_to_string)

__all__ = ["encode", "decode", "area", "toBbox", "merge", "iou", "frPyObjects", "RLEs", "rle_encode", "rle_decode",
           "rle_area", "rle_to_bbox", "rle_iou", "rle_merge", "rle_to_string", "rle_from_string",
           "rle_from_polygons"]

from .rrle import (DIALECTS, DecodeReport, RRLEDecoder, Separators, descriptors_to_mask, rrle_decode, rrle_encode,
                   semantic_descriptors)

__all__ += ["rrle_encode", "rrle_decode", "RRLEDecoder", "Separators", "DIALECTS", "DecodeReport",
            "semantic_descriptors", "descriptors_to_mask"]
