"""Mask codecs (fastvision.masks): COCO RLE against pycocotools, byte for byte, and
Text4Seg's R-RLE against its format; malformed input; property-based fuzzing
of both decoders; the registered ops (opcheck, direct-call fuzz).

The conformance suite's OpSpec describes differentiable fused ops (reference,
gradients, backends); the codecs are neither, so the generic checks that
apply to them run here: opcheck of every registered codec op on recorded
calls, torch.compile where a tensor op is involved, and the direct-call fuzz
(masks_direct_calls() is also recorded by tests/test_fuzz.py).
"""

import dataclasses
import io
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvision.masks as fm
from fastvision._extension import C
from fastvision.reference.masks import rle_counts, text4seg_decode_mask, text4seg_encode_mask
from fastvision.testing import fuzz_direct_calls, fuzz_mutations, record_direct_calls

M = pytest.importorskip("pycocotools.mask")

OPS = torch.ops.fastvision
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def patterns(h, w, seed=0):
    """Named (h, w) uint8 masks: the edge cases and random ones."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    single = np.zeros((h, w), np.uint8)
    single[h // 2, w // 2] = 1
    return {
        "empty": np.zeros((h, w), np.uint8),
        "full": np.ones((h, w), np.uint8),
        "single": single,
        "stripes_h": (yy % 2).astype(np.uint8),
        "stripes_v": (xx % 3 == 0).astype(np.uint8),
        "checker": ((yy + xx) % 2).astype(np.uint8),
        "random": (rng.random((h, w)) < 0.5).astype(np.uint8),
        "sparse": (rng.random((h, w)) < 0.03).astype(np.uint8),
        "blob": ((yy - h / 3) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2).astype(np.uint8),
        "first_last": np.pad(np.ones((1, 1), np.uint8), ((0, h - 1), (0, w - 1)))[::-1, ::-1].copy(),
    }


SHAPES = [(1, 1), (1, 17), (17, 1), (7, 9), (32, 48), (65, 33)]


def stack(masks):
    return np.asfortranarray(np.stack(masks, axis=2))


@pytest.mark.parametrize("h,w", SHAPES)
def test_encode_byte_identical_to_pycocotools(h, w):
    pats = patterns(h, w)
    batch = stack(list(pats.values()))
    want = M.encode(batch)
    assert fm.encode(batch) == want
    assert fm.encode(np.ascontiguousarray(batch)) == want  # C order works too
    assert fm.encode(batch.astype(bool)) == want
    assert fm.encode((batch * 255).astype(np.uint8)) == want
    for name, m in pats.items():
        assert fm.encode(np.asfortranarray(m)) == M.encode(np.asfortranarray(m)), name
    # The torch-native API, row-major and column-major input.
    t = torch.from_numpy(np.ascontiguousarray(batch.transpose(2, 0, 1)))
    assert fm.rle_to_string(fm.rle_encode(t)) == [r["counts"] for r in want]
    assert fm.rle_to_string(fm.rle_encode(t.transpose(1, 2).contiguous().transpose(1, 2))) == [r["counts"] for r in want]
    assert fm.rle_encode(t.bool()).counts_list() == [rle_counts(m) for m in t.numpy()]


@pytest.mark.parametrize("h,w", SHAPES)
def test_decode_and_round_trips(h, w):
    batch = stack(list(patterns(h, w, seed=1).values()))
    rles = M.encode(batch)
    out = fm.decode(rles)
    assert out.dtype == np.uint8 and out.flags.f_contiguous and np.array_equal(out, M.decode(rles))
    assert np.array_equal(fm.decode(rles[3]), M.decode(rles[3]))
    str_rles = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]  # str counts
    assert np.array_equal(fm.decode(str_rles), batch)
    t = torch.from_numpy(np.ascontiguousarray(batch.transpose(2, 0, 1)))
    assert torch.equal(fm.rle_decode(fm.rle_encode(t)), t.bool())
    assert torch.equal(fm.rle_decode(rles), t.bool())
    again = fm.rle_from_string([r["counts"] for r in rles], h, w)
    assert fm.rle_to_string(again) == [r["counts"] for r in rles]
    unc = fm.RLEs.from_coco(str_rles).to_coco(compressed=False)
    assert np.array_equal(fm.decode(unc), batch)  # uncompressed RLEs decode too


def test_area_bbox_merge_iou_equal_pycocotools():
    rng = np.random.default_rng(3)
    h, w = 40, 30
    masks = list(patterns(h, w, seed=2).values())
    masks += [np.pad(np.ones((rng.integers(1, 10), rng.integers(1, 10)), np.uint8),
                     ((y := rng.integers(0, 30), h - y - 0), (x := rng.integers(0, 20), w - x - 0)))[:h, :w]
              for _ in range(12)]
    rles = M.encode(stack(masks))
    assert np.array_equal(fm.area(rles), M.area(rles)) and fm.area(rles).dtype == M.area(rles).dtype
    assert fm.area(rles[2]) == M.area(rles[2])
    assert np.array_equal(fm.toBbox(rles), M.toBbox(rles))
    assert np.array_equal(fm.toBbox(rles[5]), M.toBbox(rles[5]))
    for intersect in (False, True, 0, 1):
        assert fm.merge(rles, intersect) == M.merge(rles, intersect)
        assert fm.merge(rles[4:9], intersect) == M.merge(rles[4:9], intersect)
    assert fm.merge(rles[:1]) == M.merge(rles[:1])
    crowd = rng.integers(0, 2, len(rles) - 3)
    got, want = fm.iou(rles, rles[3:], crowd), M.iou(rles, rles[3:], crowd)
    assert got.shape == want.shape and np.array_equal(got, want)
    boxes = M.toBbox(rles) + rng.random((len(rles), 4))
    assert np.array_equal(fm.iou(boxes, boxes[3:], crowd), M.iou(boxes, boxes[3:], crowd))
    assert np.array_equal(fm.iou(boxes.tolist(), boxes[3:].tolist(), list(crowd)),
                          M.iou(boxes.tolist(), boxes[3:].tolist(), list(crowd)))
    assert fm.iou([], rles, [0] * len(rles)) == M.iou([], rles, [0] * len(rles)) == []
    # The torch-native API agrees.
    t = fm.RLEs.from_coco(rles)
    assert torch.equal(fm.rle_iou(t, fm.RLEs.from_coco(rles[3:]), crowd), torch.from_numpy(want))
    assert torch.equal(fm.rle_area(t), torch.from_numpy(M.area(rles).astype(np.int64)))
    assert torch.equal(fm.rle_to_bbox(t), torch.from_numpy(M.toBbox(rles)))


def test_iou_fast_path_equals_general_path():
    # fm.iou reads lists of pycocotools dicts in one C++ call (rle_iou_coco); the general
    # path (RLEs, rle_iou) must agree with it and with pycocotools on every kind of mask:
    # single-run columns, columns of several runs, runs crossing columns, empty masks.
    rng = np.random.default_rng(7)
    for h, w in [(1, 1), (1, 40), (40, 1), (23, 31), (64, 48)]:
        masks = list(patterns(h, w, seed=h + w).values())
        yy, xx = np.mgrid[:h, :w]
        masks += [(((yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2) < rng.uniform(1, 20) ** 2)
                  .astype(np.uint8) for _ in range(10)]
        rles = M.encode(stack(masks))
        crowd = rng.integers(0, 2, len(rles))
        want = M.iou(rles, rles, crowd)
        got = fm.iou(rles, rles, crowd)
        general = fm.rle_iou(fm.RLEs.from_coco(rles), fm.RLEs.from_coco(rles), crowd).numpy()
        assert np.array_equal(got, want) and np.array_equal(general, want) and got.flags.writeable
        as_str = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]
        assert np.array_equal(fm.iou(as_str, rles[::-1], crowd), M.iou(rles, rles[::-1], crowd))
    # Forms the fast path leaves to the general one: uncompressed counts, sizes as arrays.
    unc = [{"size": r["size"], "counts": fm.RLEs.from_coco([r]).counts_list()[0]} for r in rles[:3]]
    assert np.array_equal(fm.iou(unc, rles[:2], [0, 1]), M.iou(rles[:3], rles[:2], [0, 1]))
    arr = [{"size": np.array(r["size"]), "counts": r["counts"]} for r in rles[:3]]
    assert np.array_equal(fm.iou(arr, rles[:2], [0, 1]), M.iou(rles[:3], rles[:2], [0, 1]))
    assert C.rle_iou_coco(unc, rles, bytes(len(rles))) is None


def test_iou_fast_path_errors_and_tall_masks():
    a = M.encode(np.asfortranarray(np.ones((3, 4), np.uint8)))
    for bad, match in [({"size": [3, 4], "counts": b"l"}, "truncated"), ({"size": [-3, 4], "counts": b"0"},
                                                                         "non-negative"),
                       ({"size": [4, 3], "counts": a["counts"]}, "one size"), ({"size": [3, 4], "counts": "é"},
                                                                                "ASCII")]:
        for dt, gt in ([bad], [a]), ([a], [bad]):
            with pytest.raises(ValueError, match=match):
                fm.iou(dt, gt, [0])
    with pytest.raises(ValueError, match="one flag per ground truth"):
        C.rle_iou_coco([a], [a], b"\0\0")
    with pytest.raises(TypeError):
        C.rle_iou_coco([a], [a])
    # Rows beyond int32 (and masks too wide for per-column rows): the interval walk.
    h = 2**31 + 5
    tall = [{"size": [h, 2], "counts": [h - 3, 7, h - 4]}, {"size": [h, 2], "counts": [h + 1, 6, h - 7]},
            {"size": [h, 2], "counts": [2 * h]}]
    rles = fm.RLEs.from_coco(tall)
    strings = [{"size": [h, 2], "counts": s} for s in fm.rle_to_string(rles)]
    want = [[1.0, 3 / 10, 0.0], [3 / 10, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert fm.rle_iou(rles, rles).tolist() == want
    assert fm.iou(strings, strings, [0, 0, 0]).tolist() == want
    wide = fm.RLEs.from_coco([{"size": [1, 2**25], "counts": [5, 2**25 - 10, 5]},
                              {"size": [1, 2**25], "counts": [0, 10, 2**25 - 10]}])
    assert fm.rle_iou(wide, wide).tolist() == [[1.0, 5 / (2**25 - 5)], [5 / (2**25 - 5), 1.0]]


@pytest.mark.parametrize("h,w", [(1, 30), (30, 1), (37, 23)])
def test_iou_random_masks_equal_pycocotools(h, w):
    rng = np.random.default_rng(h * w)
    yy, xx = np.mgrid[:h, :w]
    blobs = [((yy - rng.uniform(0, h)) ** 2 / rng.uniform(1, h) ** 2 + (xx - rng.uniform(0, w)) ** 2
              / rng.uniform(1, w) ** 2 < 1) ^ (rng.random((h, w)) < 0.05 * k) for k in range(30)]
    rles = M.encode(stack([b.astype(np.uint8) for b in blobs]))
    crowd = rng.integers(0, 2, 20)
    assert np.array_equal(fm.iou(rles[:25], rles[10:], crowd), M.iou(rles[:25], rles[10:], crowd))


def test_frpyobjects_equal_pycocotools():
    rng = np.random.default_rng(4)
    h, w = 60, 80
    polys = [rng.uniform(-5, 90, size=2 * k).tolist() for k in (3, 5, 8, 20)]
    polys.append([10.0, 10.0, 10.0, 10.0, 30.0, 12.5, 20.0, 40.0])  # a repeated vertex
    assert fm.frPyObjects(polys, h, w) == M.frPyObjects(polys, h, w)
    # One polygon gives one dict (pycocotools 2.0.11 raises TypeError there: len() of a float).
    assert fm.frPyObjects(polys[1], h, w) == M.frPyObjects([polys[1]], h, w)[0]
    boxes = np.c_[rng.uniform(-5, 70, (6, 2)), rng.uniform(0.5, 30, (6, 2))]
    assert fm.frPyObjects(boxes, h, w) == M.frPyObjects(boxes, h, w)
    # Boxes as lists (pycocotools 2.0.11 raises TypeError: it wants an ndarray there).
    assert fm.frPyObjects(boxes.tolist(), h, w) == M.frPyObjects(boxes, h, w)
    assert fm.frPyObjects(boxes[0].tolist(), h, w) == M.frPyObjects(boxes[:1], h, w)[0]
    unc = [{"size": [4, 5], "counts": [3, 4, 13]}, {"size": [2, 2], "counts": [0, 4]}]
    assert fm.frPyObjects(unc, h, w) == M.frPyObjects(unc, h, w)
    assert fm.frPyObjects(unc[0], h, w) == M.frPyObjects(unc[0], h, w)
    with pytest.raises(TypeError, match="input type is not supported"):
        fm.frPyObjects("polygon", h, w)


@pytest.mark.parametrize("bad,match", [
    ({"size": [3, 4], "counts": [5, 8]}, "counts sum to more than h \\* w"),
    ({"size": [3, 4], "counts": [5, 6]}, "counts sum to 11, not h \\* w"),
    ({"size": [3, 4], "counts": [5, -1, 8]}, "negative"),
    ({"size": [3, 4], "counts": b"3"}, "counts sum to 3"),
    ({"size": [3, 4], "counts": b"3\x7f"}, "not a count character"),
    ({"size": [3, 4], "counts": b"l"}, "truncated"),
    ({"size": [3, 4], "counts": b"o" * 13 + b"0"}, "overflows"),
    ({"size": [3, 4], "counts": b"52N"}, "negative"),
    ({"size": [-3, 4], "counts": b"0"}, "non-negative"),
    ({"size": [3], "counts": b"0"}, "'size' must be \\[h, w\\]"),
])
def test_malformed_rles_raise_value_error(bad, match):
    for fn in (fm.decode, fm.area, fm.toBbox, lambda r: fm.merge([r, r]), fm.rle_decode):
        with pytest.raises(ValueError, match=match):
            fn(bad)


def test_mismatched_sizes_and_layouts():
    a = M.encode(np.asfortranarray(np.ones((3, 4), np.uint8)))
    b = M.encode(np.asfortranarray(np.ones((4, 3), np.uint8)))
    for fn in (fm.decode, fm.merge, lambda r: fm.iou(r[:1], r[1:], [0])):
        with pytest.raises(ValueError, match="size"):
            fn([a, b])
    with pytest.raises(ValueError, match="one flag per ground truth"):
        fm.iou([a], [a], [0, 1])
    with pytest.raises(ValueError, match="must be contiguous"):
        OPS.rle_encode(torch.zeros(2, 3, 8, dtype=torch.uint8)[:, :, ::2])
    with pytest.raises(ValueError, match="must be uint8 or bool"):
        OPS.rle_encode(torch.zeros(2, 3, 4))
    odd = torch.zeros(2, 3, 8, dtype=torch.uint8)[:, :, ::2]  # the public function copies instead
    assert fm.rle_encode(odd).counts_list() == [[12], [12]]


def test_gigapixel_counts_are_64_bit():
    # h * w >= 2^32: counts and strings beyond pycocotools' 32 bits (no mask is allocated).
    h, w = 2**16 + 3, 2**16 + 5
    counts = [2**32 + 7, 5, h * w - 2**32 - 12]
    rle = fm.RLEs.from_coco([{"size": [h, w], "counts": counts}])
    s = fm.rle_to_string(rle)[0]
    assert fm.rle_from_string(s, h, w).counts_list() == [counts]
    assert fm.rle_area(rle).tolist() == [5]
    x, y = divmod(2**32 + 7, h)
    assert fm.rle_to_bbox(rle).tolist() == [[x, y, 1, 5]]
    assert fm.rle_iou(rle, rle).tolist() == [[1.0]]


# --------------------------------------------------------------------------
# Property-based fuzzing of the COCO decoder


@FUZZ
@given(st.binary(max_size=40), st.integers(0, 12), st.integers(0, 12))
def test_fuzz_rle_string_decoder_raises_only_value_error(data, h, w):
    try:
        rles = fm.rle_from_string([data], h, w)
    except ValueError as err:
        assert str(err).startswith("fastvision.rle_from_string: ") or "ASCII" in str(err)
        return
    masks = fm.rle_decode(rles)
    assert masks.shape == (1, h, w)
    if h * w:
        assert fm.rle_to_string(fm.rle_encode(masks)) == [data]  # valid strings are canonical


@FUZZ
@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(1, 8), st.data())
def test_fuzz_mutated_rle_strings(bits, h, data):
    w = max(1, len(bits) // h)
    m = np.asfortranarray(np.array(bits[:h * w] + [False] * (h * w - len(bits[:h * w])), np.uint8).reshape(h, w))
    s = bytearray(fm.encode(m)["counts"])
    assert s == M.encode(m)["counts"]
    op = data.draw(st.sampled_from(["flip", "drop", "insert", "none"]))
    if op != "none" and s:
        i = data.draw(st.integers(0, len(s) - 1))
        if op == "flip":
            s[i] = data.draw(st.integers(0, 255))
        elif op == "drop":
            del s[i]
        else:
            s.insert(i, data.draw(st.integers(40, 120)))
    try:
        out = fm.decode({"size": [h, w], "counts": bytes(s)})
    except ValueError:
        return
    assert out.shape == (h, w) and set(np.unique(out)) <= {0, 1}


# --------------------------------------------------------------------------
# R-RLE


NAMES = ["others", "cat", "big dog", "traffic light"]


def grid(h, w, seed=0, k=3):
    g = torch.randint(0, k, (h, w), generator=torch.Generator().manual_seed(seed))
    g[: h // 3] = 0  # long runs too
    return g


@pytest.mark.parametrize("h,w", [(1, 1), (1, 9), (9, 1), (16, 16), (24, 24), (5, 64)])
def test_rrle_byte_identical_to_text4seg_and_round_trip(h, w):
    g = grid(h, w, seed=h * w, k=4)
    rows = [[NAMES[v] for v in r] for r in g.tolist()]
    text = fm.rrle_encode(g, NAMES)
    assert text == text4seg_encode_mask(rows)
    assert fm.rrle_encode(rows) == text  # nested list of strings
    assert fm.rrle_encode(g.numpy(), NAMES) == text
    assert text4seg_decode_mask(text) == [v for r in rows for v in r]
    labels, names, report = fm.rrle_decode(text, h, w, NAMES, strict=True)
    assert torch.equal(labels, g) and names == NAMES and not report
    labels, names, _ = fm.rrle_decode(text, h, w)  # names found in order of appearance
    assert [names[v] for v in labels.flatten().tolist()] == [v for r in rows for v in r]


def names_tensors(names):
    data = [n.encode() for n in names]
    return (torch.tensor(list(b"".join(data)), dtype=torch.uint8),
            torch.tensor([0] + [len(d) for d in data]).cumsum(0))


def op_encode(labels, names, seps=fm.Separators(), form=0):
    """The registered op's texts (the general path of the C++ codec)."""
    text, offsets = OPS.rrle_encode(labels, *names_tensors(names), *seps, form)
    raw, o = bytes(text.tolist()), offsets.tolist()
    texts = [raw[o[i]:o[i + 1]].decode() for i in range(len(o) - 1)]
    return texts if labels.dim() == 3 else texts[0]


def op_decode(texts, h, w, names=None, seps=fm.Separators(), strict=False, form=-1, fill=0):
    data = [t.encode() for t in texts]
    grid, lbytes, loffsets, reps = OPS.rrle_decode(
        torch.tensor(list(b"".join(data)), dtype=torch.uint8), torch.tensor([0] + [len(d) for d in data]).cumsum(0),
        *names_tensors(names or []), fill, h, w, *seps, strict, form)
    raw, o = bytes(lbytes.tolist()), loffsets.tolist()
    return grid, [raw[o[i]:o[i + 1]].decode() for i in range(len(o) - 1)], reps.tolist()


@pytest.mark.parametrize("form", [0, 1, 2])
def test_rrle_fast_path_equals_op(form):
    # fm.rrle_encode / rrle_decode call the codec through _C's plain functions; the ops
    # are its tensor form: both give the same texts, labels, label tables and repairs.
    seps = fm.DIALECTS["semicolon"] if form == 1 else fm.Separators()
    name = {0: "row", 1: "image", 2: "none"}[form]
    for h, w in [(1, 1), (1, 9), (9, 1), (5, 7), (24, 24), (0, 3), (3, 0)]:
        g = grid(h, w, seed=h * 31 + w, k=4)
        batch = torch.stack([grid(h, w, seed=s, k=4) for s in range(3)])
        text = fm.rrle_encode(g, NAMES, separators=seps, form=name)
        assert text == op_encode(g, NAMES, seps, form)
        assert fm.rrle_encode(batch, NAMES, separators=seps, form=name) == op_encode(batch, NAMES, seps, form)
        assert fm.rrle_encode(batch[:0], NAMES) == []
        # The general Python path (converted labels, names as non-str) gives the same text.
        for labels in (g.int(), g.numpy(), g.t().contiguous().t() if h > 1 and w > 1 else g.clone(),
                       torch._neg_view(-g)):
            assert fm.rrle_encode(labels, NAMES, separators=seps, form=name) == text
        assert fm.rrle_encode(g, tuple(NAMES), separators=seps, form=name) == text
        rng = np.random.default_rng(h * w)
        for t in [text, text[: len(text) // 2], text.replace(seps.run, seps.run.strip(), 1), text + "x *2\n"]:
            for names in (NAMES, None):
                for strict in (False, True):
                    try:
                        want = op_decode([t], h, w, names, seps, strict, form)
                    except ValueError as err:
                        with pytest.raises(ValueError, match=re.escape(str(err))):
                            fm.rrle_decode(t, h, w, names, strict, separators=seps, form=name, unknown="background")
                        continue
                    labels, found, report = fm.rrle_decode(t, h, w, names, strict, separators=seps, form=name,
                                                           unknown="background")
                    extra = want[1][len(names or []):]
                    if names is None or not extra:
                        assert torch.equal(labels, want[0][0]) and found == (names or want[1])
                    assert [(r.row, r.col, r.occurrences) for r in report.repairs
                            if r.kind != "unknown label"] == [tuple(r[2:]) for r in want[2]]
            texts = [t[: rng.integers(0, len(t) + 1)] for _ in range(4)] + [text]
            labels, found, reports = fm.rrle_decode(texts, h, w, None, separators=seps, form=name)
            want = op_decode(texts, h, w, None, seps, False, form)
            assert torch.equal(labels, want[0]) and found == want[1] and len(reports) == len(texts)


def test_rrle_fast_path_bad_input():
    g = grid(3, 4)
    with pytest.raises(ValueError, match=r"labels\[0, 1, 2\] = 9 is not an index into the 4 names"):
        fm.rrle_encode(torch.where(torch.arange(12).view(3, 4) == 6, 9, g), NAMES)
    with pytest.raises(ValueError, match=re.escape("label 'a\\n' contains the row separator '\\n'")):
        fm.rrle_encode(g, ["x", "a\n", "b", "c"])
    with pytest.raises(ValueError, match="run_sep, row_sep and count_sep must not be empty"):
        C.rrle_encode(g[:0], [], ("", "\n", "*", "\n"), 0)  # (with names: 'contains the run separator', as before)
    with pytest.raises(ValueError, match="form must be 0"):
        C.rrle_encode(g, NAMES, fm.Separators(), 7)
    with pytest.raises(ValueError, match=re.escape("names must be distinct; got ['a', 'a']")):
        fm.rrle_decode("a *1\n", 1, 1, ["a", "a"])
    with pytest.raises(ValueError, match="names must not be empty"):
        fm.rrle_decode("a *1\n", 1, 1, [])
    with pytest.raises(ValueError, match=re.escape("background must index names (0..1); got 2")):
        fm.rrle_decode("a *1\n", 1, 1, ["a", "b"], background=2)
    with pytest.raises(TypeError, match="got int"):
        fm.rrle_decode(["a *1\n", 3], 1, 1)
    with pytest.raises(ValueError, match="h must be"):
        fm.rrle_decode("a *1\n", -1, 1)
    assert fm.rrle_decode("a *1\n", 1, 1, [1, "a"])[1] == ["1", "a"]  # names str()-ed
    assert C.rrle_encode(g.float(), NAMES, fm.Separators(), 0) is NotImplemented
    assert C.rrle_encode(g, [1, 2, 3], fm.Separators(), 0) is NotImplemented
    assert C.rrle_encode(g.to("meta"), NAMES, fm.Separators(), 0) is NotImplemented


@pytest.mark.parametrize("exchange", [True, False], ids=["dlpack-exchange", "attributes"])
def test_rrle_encode_reads_tensors_in_place_or_declines(exchange):
    """The C++ encoder reads a CPU int64 contiguous tensor in place (through
    DLPack's C exchange API where torch has one, else the tensor's attributes)
    and declines the rest (NotImplemented), which rrle_encode converts first:
    the text is the same either way."""
    g = grid(4, 6, k=4)
    cases = {
        "contiguous": (g, True),
        "batch": (torch.stack([g, g.flip(0)]), True),
        "a view at an offset": (g[1:], True),
        "size-1 dims with odd strides": (g[:1].as_strided((1, 6, 1), (99, 1, 7)), True),
        "empty": (torch.zeros(0, 3, dtype=torch.long), True),
        "transposed": (g.t(), False),
        "every other column": (g[:, ::2], False),
        "negative view": ((-g)._neg_view(), False),  # (its memory holds -g)
        "int32": (g.int(), False),
        "float": (g.float(), False),
        "4 dims": (g[None, None], False),
        "sparse": (g.to_sparse(), False),
        "meta": (g.to("meta"), False),
        "subclass": (g.as_subclass(type("Sub", (torch.Tensor,), {})), False),
    }
    before = C._dlpack_exchange(exchange)
    try:
        for name, (x, in_place) in cases.items():
            direct = C.rrle_encode(x, NAMES, fm.Separators(), 0)
            assert (direct is not NotImplemented) == in_place, name
            if name in ("float", "sparse", "meta", "4 dims"):  # (rrle_encode raises: tested above)
                continue
            plain = torch.tensor(x.tolist(), dtype=torch.long).reshape(x.shape)  # (a fresh contiguous copy)
            assert fm.rrle_encode(x, NAMES) == fm.rrle_encode(plain, NAMES), name
            if in_place:
                assert direct == fm.rrle_encode(plain, NAMES), name
    finally:
        C._dlpack_exchange(before)


@FUZZ
@given(st.data())
def test_fuzz_python_codec_functions(data):
    # _C's plain functions called directly with odd arguments: exceptions only, never a crash
    # (the sanitizer run reads this too).
    g = grid(3, 4)
    values = [None, 0, -1, 2**62, -2**63, 1.5, "", "a *1\n", b"x", [], ["a"], ("a", 1), [[1]], {"a": 1},
              fm.Separators(), ("", "", "", ""), g, g[:, ::2], g.float(), g[None], torch.zeros(0, 0, dtype=torch.long),
              [{"size": [3, 4], "counts": b"<"}], [{"size": [3, 2**62], "counts": b"0"}], [{"size": [3], "counts": 1}]]
    calls = [(C.rrle_encode, [g, NAMES, fm.Separators(), 0]),
             (C.rrle_decode, ["a *1| b *3\n", 1, 4, None, 0, fm.Separators(), False, -1]),
             (C.rle_iou_coco, [[{"size": [3, 4], "counts": b"<"}], [{"size": [3, 4], "counts": b"<"}], b"\0"])]
    fn, args = data.draw(st.sampled_from(calls))
    args = list(args)
    for _ in range(data.draw(st.integers(1, 2))):
        args[data.draw(st.integers(0, len(args) - 1))] = data.draw(st.sampled_from(values))
    try:
        fn(*args)
    except (TypeError, ValueError, OverflowError, MemoryError, UnicodeError):
        pass
    except RuntimeError as err:  # only a tensor's own bool() (strict=tensor), as in Python
        assert "ambiguous" in str(err), err


def test_rrle_batches_equal_one_by_one():
    grids = torch.stack([grid(9, 11, seed=s, k=4) for s in range(6)])
    texts = fm.rrle_encode(grids, NAMES)
    assert texts == [fm.rrle_encode(g, NAMES) for g in grids]
    texts[2] = texts[2].replace("\n ", "\n", 1)  # one text needing a repair
    labels, names, reports = fm.rrle_decode(texts, 9, 11)
    assert torch.equal(labels, torch.stack([torch.tensor([names.index(n) for n in
                                                           [NAMES[v] for v in g.flatten().tolist()]]).view(9, 11)
                                             for g in grids]))
    assert [bool(r) for r in reports] == [False, False, True, False, False, False]
    labels, _, _ = fm.rrle_decode(texts, 9, 11, NAMES)
    assert torch.equal(labels, grids)


def test_rrle_example_format():
    g = torch.zeros(16, 16, dtype=torch.long)
    g[2, 5:11] = 1
    text = fm.rrle_encode(g, ["others", "cat"])
    assert text.startswith("others *16\n others *16\n others *5| cat *6| others *5\n others *16")
    assert text.endswith("others *16\n") and text.count("\n ") == 15


@pytest.mark.parametrize("form", ["row", "image", "none"])
@pytest.mark.parametrize("dialect", sorted(fm.DIALECTS))
def test_rrle_dialects_and_forms_round_trip(dialect, form):
    g = grid(6, 7, seed=1, k=3)
    text = fm.rrle_encode(g, NAMES, separators=dialect, form=form)
    seps = fm.DIALECTS[dialect]
    assert (seps.row in text[:-len(seps.end)]) == (form != "image") and text.endswith(seps.end)
    labels, _, report = fm.rrle_decode(text, 6, 7, NAMES)  # tolerant: detects dialect and form
    assert torch.equal(labels, g) and not report.repairs and report.dialect == dialect
    labels, _, _ = fm.rrle_decode(text, 6, 7, NAMES, strict=True, separators=seps, form=form)
    assert torch.equal(labels, g)


def test_rrle_labels_with_separators():
    g = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="contains the run separator"):
        fm.rrle_encode(g, ["a", "b|c"])
    with pytest.raises(ValueError, match="contains the count separator"):
        fm.rrle_encode(g, ["a", "b*"])
    text = fm.rrle_encode(g, ["a", "b|c\n*"], escape=True)
    labels, names, _ = fm.rrle_decode(text, 1, 2, escape=True)
    assert names == ["a", "b|c\n*"] and labels.tolist() == [[0, 1]]


REPAIRS = [
    ("others *3| cat *2\nothers *5\n", [[0, 0, 0, 1, 1], [0] * 5], "row separator"),
    ("others *3|cat *2\n others *5\n", [[0, 0, 0, 1, 1], [0] * 5], "run separator"),
    ("others * 3| cat *2\n others*5\n", [[0, 0, 0, 1, 1], [0] * 5], "count separator"),
    ("others *3| cat *1\n others *5\n", [[0, 0, 0, 1, 1], [0] * 5], "padded with its last label"),
    ("others *3| cat *4\n others *5\n", [[0, 0, 0, 1, 1], [0] * 5], "cut at w"),
    ("others *3| cat *2\n", [[0, 0, 0, 1, 1]] * 2, "rows missing"),
    ("others *3| cat *2\n others *5\n cat *5\n", [[0, 0, 0, 1, 1], [0] * 5], "extra rows"),
    ("others *3| kat *2\n others *5\n", [[0, 0, 0, 1, 1], [0] * 5], "'kat' -> 'cat'"),
    ("others *3| zebra *2\n others *5\n", [[0] * 5, [0] * 5], "'zebra' -> 'others'"),
    ("<seg>others *3| cat *2\n others *2| ca", [[0, 0, 0, 1, 1], [0] * 5], "cut off"),
    ("others *3| cat *2\n others *5", [[0, 0, 0, 1, 1], [0] * 5], "end marker"),
    ("others *3| cat *x| cat *2\n others *5\n", [[0, 0, 0, 1, 1], [0] * 5], "malformed run"),
    ("others *3| cat| cat *1\n others *5\n", [[0, 0, 0, 1, 1], [0] * 5], "without a count"),
    ("others *3| cat *2\n\n others *5\n", [[0, 0, 0, 1, 1], [0] * 5], "blank row"),
]


@pytest.mark.parametrize("text,want,says", REPAIRS, ids=[r[2] for r in REPAIRS])
def test_rrle_tolerant_repairs_and_strict_errors(text, want, says):
    labels, names, report = fm.rrle_decode(text, 2, 5, ["others", "cat"])
    assert labels.tolist() == want
    assert says in str(report), str(report)
    with pytest.raises(ValueError, match=r"fastvision.rrle_decode: .*(row \d+, column \d+|<seg>|end marker)"):
        fm.rrle_decode(text, 2, 5, ["others", "cat"], strict=True)


def test_streaming_equals_one_shot():
    g = grid(12, 10, seed=5, k=4)
    clean = fm.rrle_encode(g, NAMES)
    messy = "Sure.\n<seg>" + clean.replace("\n ", "\n").replace("| ", "|")[:-25] + " garbage"
    for text in (clean, "<seg>" + clean + "</seg>", messy):
        for names in (NAMES, None):
            dec = fm.RRLEDecoder(12, 10, names)
            rows = []
            for i in range(0, len(text), 7):
                got = dec.feed(text[i:i + 7])
                rows += got
            labels, found, report = dec.close()
            ref = fm.rrle_decode(text, 12, 10, names)
            assert torch.equal(labels, ref[0]) and found == ref[1]
            assert [i for i, _ in rows] == list(range(len(rows))) and len(rows) >= 10
            assert torch.equal(torch.stack([r for _, r in rows]), labels[:len(rows)])


def test_semantic_descriptors_and_back():
    import torch.nn.functional as F

    mask = torch.randint(0, 5, (2, 97, 131))
    for grid_size in (16, (24, 20), 64):
        sd = fm.semantic_descriptors(mask, grid_size)
        ref = F.interpolate(mask[:, None].float(), size=sd.shape[-2:], mode="nearest-exact")[:, 0].long()
        assert torch.equal(sd, ref)
        for size in ((97, 131), (480, 640), (7, 5)):
            up = fm.descriptors_to_mask(sd, size)
            assert torch.equal(up, F.interpolate(sd[:, None].float(), size=size, mode="nearest")[:, 0].long())
    assert fm.semantic_descriptors(mask.to("meta"), 16).shape == (2, 16, 16)


@FUZZ
@given(st.text(alphabet=" *|\n;,<>/segabc0123456789", max_size=80), st.integers(0, 6), st.integers(0, 6),
       st.booleans())
def test_fuzz_rrle_decoder_raises_only_value_error(text, h, w, strict):
    try:
        labels, names, report = fm.rrle_decode(text, h, w, None if h % 2 else ["a", "b"], strict=strict)
    except ValueError as err:
        assert strict or "names must" in str(err), err
        return
    assert labels.shape == (h, w) and labels.dtype == torch.long
    assert labels.numel() == 0 or 0 <= labels.min() and labels.max() < max(len(names), 1)


@FUZZ
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 10**6), st.data())
def test_fuzz_mutated_rrle(h, w, seed, data):
    g = grid(h, w, seed=seed, k=3)
    text = list(fm.rrle_encode(g, NAMES))
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "char"]))
        if op == "drop" and len(text) > 1:
            del text[i]
        elif op == "dup":
            text.insert(i, text[i])
        else:
            text[i] = data.draw(st.sampled_from(list(" *|\n9xa")))
    labels, names, report = fm.rrle_decode("".join(text), h, w, NAMES)
    assert labels.shape == (h, w) and 0 <= labels.min() and labels.max() < len(NAMES)
    try:
        fm.rrle_decode("".join(text), h, w, NAMES, strict=True)
    except ValueError:
        pass


def test_rrle_prepared_names_follow_the_objects():
    """The codecs keep the last call's names and separators prepared (csrc/masks/pyapi.h):
    a list changed in place, another list, a str subclass, a bad name after good
    calls and other separators must all be read afresh."""
    g = torch.tensor([[0, 0, 1], [1, 2, 2]])
    names = ["others", "cat", "dog"]
    assert fm.rrle_encode(g, names) == "others *2| cat *1\n cat *1| dog *2\n"
    names[1] = "big cat"
    assert fm.rrle_encode(g, names) == "others *2| big cat *1\n big cat *1| dog *2\n"
    assert fm.rrle_encode(g, ("a", "b", "c")) == "a *2| b *1\n b *1| c *2\n"
    assert fm.rrle_encode(g, ["a", type("S", (str,), {})("b"), "c"]) == "a *2| b *1\n b *1| c *2\n"
    assert fm.rrle_encode(g, names, separators="compact") == "others*2,big cat*1;big cat*1,dog*2;"
    with pytest.raises(ValueError, match="contains the run separator"):
        fm.rrle_encode(g, ["a", "b|", "c"])
    text = "x *2| y *1\n y *1| z *2\n"
    names = ["x", "y", "z"]
    assert fm.rrle_decode(text, 2, 3, names)[0].tolist() == [[0, 0, 1], [1, 2, 2]]
    names.reverse()
    labels, got, _ = fm.rrle_decode(text, 2, 3, names)
    assert labels.tolist() == [[2, 2, 1], [1, 0, 0]] and got == ["z", "y", "x"] and got is not names
    assert fm.rrle_decode(text, 2, 3, None)[1] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="names must be distinct"):
        fm.rrle_decode(text, 2, 3, ["x", "y", "x"])
    with pytest.raises(ValueError, match="names must not be empty"):
        fm.rrle_decode(text, 2, 3, [])
    assert fm.rrle_decode(text, 2, 3, [1, "y", "z"])[1] == ["1", "y", "z"]


def _decode_both_paths(text, h, w, names, strict, seps):
    """rrle_decode with and without the decoder's one-pass path for exact texts."""
    out = []
    for exact in (True, False):
        before = C._rrle_exact_path(exact)
        try:
            res = fm.rrle_decode(text, h, w, names, strict=strict, separators=seps)
            out.append(("ok", res[0], res[1], [str(r) for r in (res[2] if isinstance(res[2], list) else [res[2]])]))
        except ValueError as err:
            out.append(("error", str(err)))
        finally:
            C._rrle_exact_path(before)
    return out


SEPARATOR_SETS = [*fm.DIALECTS.values(), fm.Separators(count="* "), fm.Separators(count=" * "),
                  fm.Separators(run=" | "), fm.Separators(row="\n", end="$")]


@settings(FUZZ, max_examples=400)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 10**6), st.sampled_from(range(len(SEPARATOR_SETS))),
       st.booleans(), st.booleans(), st.data())
def test_rrle_exact_path_equals_general_parse(h, w, seed, which, strict, known, data):
    """Exact texts take a one-pass decoder (csrc/masks/rrle.h, Decoder::decode_exact);
    it must agree with the general parse on every text: exact ones, and ones
    that differ from exact by a character, a split run, a leading zero, a
    zero or too large count, a run of 0, spaces, a tab, a missing or extra row.
    Rows often repeat the row above (the one-pass decoder copies those)."""
    seps = SEPARATOR_SETS[which]
    g = grid(h, w, seed=seed, k=4)
    for r, repeat in enumerate(data.draw(st.lists(st.booleans(), min_size=h, max_size=h))[1:], start=1):
        if repeat:
            g[r] = g[r - 1]
    text = fm.rrle_encode(g, NAMES, separators=seps)
    for _ in range(data.draw(st.integers(0, 2))):
        i = data.draw(st.integers(0, len(text)))
        edit = data.draw(st.sampled_from(["drop", "dup", "char", "split", "zero", "count", "empty run"]))
        if edit == "drop" and i < len(text):
            text = text[:i] + text[i + 1:]
        elif edit == "dup" and i < len(text):
            text = text[:i] + text[i] + text[i:]
        elif edit == "char":
            text = text[:i] + data.draw(st.sampled_from(list(" *|\n\t\r;,09xa") + ["big dog", "kat"])) + text[i:]
        elif edit == "split":  # "cat *3" -> "cat *1{run}cat *2" (exact, if the count was > 1)
            m = re.search(re.escape(seps.count) + r"([2-9])", text[i:])
            if m:
                a, b = i + m.start(), i + m.end()
                label = re.split(r"[|;,\n*]", text[:a])[-1].strip()
                text = text[:a] + seps.count + "1" + seps.run + label + seps.count + str(int(m.group(1)) - 1) + text[b:]
        else:  # one run's count with a leading zero, another count (0, one too many, 14 digits), a run of 0 after it
            counts = list(re.finditer(re.escape(seps.count) + r"(\d+)", text))
            if counts:
                m = counts[data.draw(st.integers(0, len(counts) - 1))]
                count = "0" + m.group(1) if edit == "zero" else m.group(1) + seps.run + "cat" + seps.count + "0" \
                    if edit == "empty run" else data.draw(st.sampled_from(["0", "00", str(int(m.group(1)) + 1), "9" * 14]))
                text = text[:m.start(1)] + count + text[m.end(1):]
    fast, general = _decode_both_paths(text, h, w, NAMES if known else None, strict, seps)
    assert fast[0] == general[0], (text, fast, general)
    if fast[0] == "error":
        assert fast == general
    else:
        assert torch.equal(fast[1], general[1]) and fast[2:] == general[2:], (text, fast, general)
    batch = _decode_both_paths([text, fm.rrle_encode(g, NAMES, separators=seps)], h, w, NAMES, False, seps)
    assert torch.equal(batch[0][1], batch[1][1]) and batch[0][2:] == batch[1][2:]


@pytest.mark.parametrize("text,h,w,labels,repairs", [
    ("a *2| b *2\n a *2| b *2\n", 2, 4, [[0, 0, 1, 1]] * 2, 0),
    ("a *4\n a *4\n a *4\n", 3, 4, [[0] * 4] * 3, 0),
    ("a *4\n a *40\n", 2, 4, [[0] * 4] * 2, 1),  # the row above, then more digits: cut at w
    ("a *2| b *2\n a *2| b *2| b *1\n", 2, 4, [[0, 0, 1, 1]] * 2, 1),  # the row above, then a run more
    ("a *2| b *2\n a *2| b *2", 2, 4, [[0, 0, 1, 1]] * 2, 1),  # no end marker after the copied row
    ("a *2| b *2\n a *2| b *2\na *2| b *2\n", 2, 4, [[0, 0, 1, 1]] * 2, 2),  # "\n" alone, then a row too many
    ("a *2| b *2\n a *2| b *2\n a *2| b *2\n", 2, 4, [[0, 0, 1, 1]] * 2, 1),  # a row too many
    ("a *2| b *2\n a *2| b *1\n", 2, 4, [[0, 0, 1, 1], [0, 0, 1, 1]], 1),  # a prefix of the row above: padded
])
def test_rrle_rows_repeating_the_row_above(text, h, w, labels, repairs):
    """The one-pass decoder copies a row written as the row above; only when
    that row's separator (or the end marker) follows: otherwise it is parsed."""
    for exact in (True, False):
        before = C._rrle_exact_path(exact)
        try:
            got, names, report = fm.rrle_decode(text, h, w, ["a", "b"])
        finally:
            C._rrle_exact_path(before)
        assert got.tolist() == labels and len(report.repairs) == repairs, (exact, report)


@pytest.mark.parametrize("exchange", [True, False], ids=["dlpack-exchange", "capsule"])
def test_rrle_decode_labels_are_plain_tensors_owning_their_memory(exchange):
    """The labels are made by the C++ decoder and handed to torch through DLPack
    (its C exchange API where torch has one, else a capsule): each call's tensor
    is its own, writable, contiguous, freed with the tensor (also when the call
    raises after making it), and usable as any other."""
    before = C._dlpack_exchange(exchange)
    try:
        _check_decoded_labels()
    finally:
        C._dlpack_exchange(before)


def _check_decoded_labels():
    text = fm.rrle_encode(grid(24, 24, k=3), NAMES)
    a, _, _ = fm.rrle_decode(text, 24, 24, NAMES)
    b, _, _ = fm.rrle_decode(text, 24, 24, NAMES)
    assert a.dtype == torch.long and a.shape == (24, 24) and a.is_contiguous() and a.device.type == "cpu"
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() % 8 == 0
    a += 1
    assert torch.equal(a - 1, b) and torch.equal(fm.rrle_decode(text, 24, 24, NAMES)[0], b)
    buf = io.BytesIO()
    torch.save(a, buf)
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue())), a)
    batch, _, _ = fm.rrle_decode([text, text], 24, 24, NAMES)
    assert batch.shape == (2, 24, 24) and torch.equal(batch[1], b)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if "ASAN_OPTIONS" in os.environ:  # (tools/sanitize.sh: ASan holds freed memory in quarantine)
        return
    big = fm.rrle_encode(torch.zeros(256, 256, dtype=torch.long), NAMES)  # 512 KiB of labels per call
    for _ in range(20):
        fm.rrle_decode(big, 256, 256, NAMES)
    start = rss()
    for _ in range(400):  # 200 MiB if the memory were never freed
        fm.rrle_decode(big, 256, 256, NAMES)
        with pytest.raises(ValueError, match="end marker"):  # (raised in the C++, after the labels were made)
            fm.rrle_decode(big[:-1], 256, 256, NAMES, strict=True)
        with pytest.raises(ValueError, match="unknown label"):  # (raised here, from the labels returned)
            fm.rrle_decode(big.replace("others", "cat", 1), 256, 256, NAMES[1:], strict=True)
    assert rss() - start < 32 * 2**20


def test_rrle_decode_integer_arguments():
    text = "a *2\n a *2\n"
    assert fm.rrle_decode(text, np.int64(2), torch.tensor(2), ["a"], background=np.int32(0))[0].tolist() == [[0, 0]] * 2
    for kwargs, name in [(dict(h=2.0), "h"), (dict(w="2"), "w"), (dict(background=0.0), "background")]:
        args = {"h": 2, "w": 2, "background": 0, **kwargs}
        with pytest.raises(TypeError, match=f"{name} must be an integer; got"):
            fm.rrle_decode(text, args["h"], args["w"], ["a"], background=args["background"])


# --------------------------------------------------------------------------
# The registered ops: opcheck, torch.compile, direct-call fuzz


def masks_direct_calls():
    """The direct calls of every registered codec op that the public functions make."""
    def workload():
        batch = stack(list(patterns(5, 4).values())[:4])
        rles = fm.encode(batch)
        fm.encode(np.ascontiguousarray(batch))
        fm.decode(rles)
        fm.rle_decode(rles)
        fm.area(rles)
        fm.toBbox(rles)
        fm.merge(rles)
        fm.iou(rles, rles[:2], [0, 1])  # (pycocotools dicts: the rle_iou_coco function, no op)
        fm.rle_iou(rles, rles[:2], [0, 1])
        fm.frPyObjects([[1.0, 1.0, 3.5, 1.0, 3.0, 4.0]], 5, 4)
        text = fm.rrle_encode(grid(3, 4), NAMES)
        fm.rrle_decode(text, 3, 4, NAMES)
        # The R-RLE ops themselves (tensors in and out, for torch.compile and export): the
        # functions above call the C++ codec without them.
        op_encode(grid(3, 4), NAMES)
        op_decode([text, text[:-3]], 3, 4, NAMES)
    return record_direct_calls(workload)


def test_direct_calls_cover_every_codec_op():
    ops = {c.op for c in masks_direct_calls()}
    registered = {s.name for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith("fastvision::rle") or s.name.startswith("fastvision::rrle")}
    assert ops == registered


def test_opcheck_codec_ops():
    for call in masks_direct_calls():
        result = torch.library.opcheck(call.resolve(), call.args, call.kwargs,
                                       test_utils=("test_schema", "test_faketensor"))
        assert all(v == "SUCCESS" for v in result.values()), (call.op, result)


def test_torch_compile_area_and_iou():
    rles = fm.rle_encode(torch.from_numpy(np.stack(list(patterns(6, 5).values()))))
    crowd = torch.zeros(len(rles), dtype=torch.bool)

    def fn(counts, offsets, sizes):
        return OPS.rle_area(counts, offsets, sizes) * 2, OPS.rle_iou(counts, offsets, sizes, counts, offsets, sizes,
                                                                     crowd)

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(rles.counts, rles.offsets, rles.sizes)
    want = fn(rles.counts, rles.offsets, rles.sizes)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def codec_mutations(call):
    """fuzz_mutations, where a dtype must raise unless it is the argument's own (or
    uint8 for bool and back: both are valid masks and crowd flags)."""
    out = []
    for m in fuzz_mutations(call):
        if m.kind == "dtype":
            have, want = call.args[m.arg].dtype, getattr(torch, m.value)
            same = have == want or {have, want} == {torch.uint8, torch.bool}
            m = dataclasses.replace(m, must_raise=not same)
        out.append(m)
    return out


def test_direct_call_fuzz_codec_ops():
    calls = masks_direct_calls()
    report = fuzz_direct_calls(calls, jobs=2, timeout=60.0, imports=("fastvision.masks",), mutations=codec_mutations)
    report.assert_ok()
    assert report.replays == sum(len(codec_mutations(c)) for c in calls)
    assert report.raised > report.replays // 3
