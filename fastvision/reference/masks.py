"""Pure-Python references of the mask codecs: the oracles tests and benchmarks compare with.

* :func:`text4seg_encode_mask` / :func:`text4seg_decode_mask`: Text4Seg's R-RLE
  functions (per-token Python string handling), written from their semantics;
* :func:`rle_counts`: COCO RLE counts of one mask with numpy (column-major runs).
"""

from __future__ import annotations

import numpy as np


def text4seg_encode_mask(mask_list) -> str:
    """Text4Seg's ``encode_mask``: rows of label strings -> R-RLE text."""
    rows = []
    for row in mask_list:
        runs, count = [], 1
        for j in range(1, len(row)):
            if row[j] == row[j - 1]:
                count += 1
            else:
                runs.append(f"{row[j - 1]} *{count}")
                count = 1
        runs.append(f"{row[-1]} *{count}")
        rows.append("| ".join(runs))
    return "\n ".join(rows) + "\n"


def text4seg_decode_mask(encoded: str) -> list[str]:
    """Text4Seg's ``decode_mask``: R-RLE text -> the flat list of patch labels."""
    out = []
    for row in encoded.strip("\n").split("\n "):
        for token in row.split("| "):
            label, count = token.split(" *")
            out.extend([label] * int(count))
    return out


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO RLE counts of an (h, w) mask: runs of the column-major pixels, zeros first."""
    flat = (np.asarray(mask).T.reshape(-1) != 0).astype(np.int8)
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts
