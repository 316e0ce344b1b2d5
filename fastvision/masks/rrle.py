"""Text4Seg's R-RLE ("semantic descriptors"): encode, decode (strict or tolerant), stream.

Format (Text4Seg's ``encode_mask``): each patch of an h x w grid has a label;
a row is runs ``"{label} *{count}"`` joined by ``"| "``; rows are joined by
``"\\n "``; the text ends with ``"\\n"``; runs never cross rows. For 16 x 16::

    others *16\\n others *16\\n others *5| cat *6| others *5\\n ...

The codec core is C++ (csrc/masks/rrle.h). The functions here call it through
plain CPython functions of ``fastvision._C`` (csrc/masks/pyapi.h), which take
the str, the names and a CPU int64 tensor as they are: one small grid costs
microseconds, as much as the codec's work, where a torch op's argument
conversion and dispatch would cost tens. The same core is also registered as
the ops ``torch.ops.fastvision.rrle_encode`` / ``rrle_decode`` (tensors in and
out, for torch.compile and direct calls). Separators are parameters
(:class:`Separators`; Text4Seg's by default), and the tolerant decoder
recognises the dialects of :data:`DIALECTS` by itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .._extension import C as _C  # (also loads the op schemas and CPU kernels)


class Separators(NamedTuple):
    """How an R-RLE text is written: ``{label}{count}{count_sep}`` runs joined by
    ``run``, rows joined by ``row``, the text ended by ``end``."""
    run: str = "| "
    row: str = "\n "
    count: str = " *"
    end: str = "\n"


#: Dialects seen in public code built on Text4Seg; the tolerant decoder detects them.
DIALECTS: dict[str, Separators] = {
    "text4seg": Separators(),
    "semicolon": Separators(run=", ", row="; ", count=" *", end=";"),
    "compact": Separators(run=",", row=";", count="*", end=";"),
}

FORMS = {"row": 0, "image": 1, "none": 2}
_FORM_CODES = {"auto": -1, **FORMS}  # (the C++ decoder's: -1 detects the form)
_UNKNOWN = ("closest", "background")

# Repair kinds of the C++ decoder (csrc/masks/rrle.h, enum Repair), in words.
_REPAIRS = {
    0: "row separator written differently (e.g. without its space), read as the row separator",
    1: "run separator written differently (e.g. without its space), read as the run separator",
    2: "count separator written differently ('* 3', '*3'), read as the count separator",
    3: "the text does not end with the end marker",
    4: "blank row dropped",
    5: "malformed run (no label, bad or zero count) dropped",
    6: "run without a count, taken as 1",
    7: "text cut off inside its last run, which was dropped",
    8: "row shorter than w, padded with its last label",
    9: "row longer than w, cut at w",
    10: "rows missing, filled with the last row",
    11: "extra rows dropped",
    12: "runs cover fewer than h * w patches, padded with the last label",
    13: "runs cover more than h * w patches, cut",
}


@dataclass
class Repair:
    kind: str
    row: int
    col: int
    occurrences: int = 1
    detail: str = ""

    def __str__(self) -> str:
        where = f"row {self.row}, column {self.col}: " if self.row >= 0 else ""
        times = f" ({self.occurrences} times)" if self.occurrences > 1 else ""
        return f"{where}{self.kind}{times}{': ' + self.detail if self.detail else ''}"


@dataclass(slots=True)  # (no __dict__: made on every call)
class DecodeReport:
    """What :func:`rrle_decode` found and repaired: the dialect it read, the form
    asked for ("auto": detected) and one :class:`Repair` per repair (empty for a
    well-formed text)."""
    dialect: str
    form: str
    repairs: list[Repair] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.repairs)

    def __str__(self) -> str:
        head = f"dialect {self.dialect}, form {self.form}"
        return head + ("".join(f"\n  {r}" for r in self.repairs) if self.repairs else ": no repairs")


_TEXT4SEG = Separators()
_Tensor = torch.Tensor


def _as_separators(separators) -> Separators:
    if separators is None:
        return _TEXT4SEG
    if isinstance(separators, str):
        if separators not in DIALECTS:
            raise ValueError(f"separators must be a Separators or one of {sorted(DIALECTS)}; got {separators!r}")
        return DIALECTS[separators]
    return Separators(*separators)


def escape_label(name: str) -> str:
    """The opt-in escaping of :func:`rrle_encode` (``escape=True``): separator characters
    and backslashes as ``\\xHH`` escapes, undone by ``rrle_decode(..., escape=True)``."""
    return "".join(f"\\x{ord(c):02x}" if c in "|*\n;,\\" else c for c in name)


def unescape_label(name: str) -> str:
    if "\\x" not in name:
        return name
    out, i = [], 0
    while i < len(name):
        if name.startswith("\\x", i) and i + 4 <= len(name):
            try:
                out.append(chr(int(name[i + 2:i + 4], 16)))
                i += 4
                continue
            except ValueError:
                pass
        out.append(name[i])
        i += 1
    return "".join(out)


def rrle_encode(labels, names=None, *, separators=None, form: str = "row", escape: bool = False):
    """Text4Seg's R-RLE text of an h x w label grid (a list of texts for a batch).

    ``labels``: an (h, w) integer tensor or array indexing ``names`` (or a
    batch (B, h, w): one text each, encoded in parallel), or an h x w nested
    list of label strings (``names`` then unused). With the
    default separators the text is byte-identical to Text4Seg's
    ``encode_mask``. ``form``: ``"row"`` (R-RLE), ``"image"`` (runs over the
    whole raster order) or ``"none"`` (one label per patch). A label holding a
    separator raises ValueError, unless ``escape=True`` (see :func:`escape_label`).

    >>> rrle_encode([["others", "cat", "cat"], ["others"] * 3])
    'others *1| cat *2\\n others *3\\n'
    """
    seps = _TEXT4SEG if separators is None else _as_separators(separators)
    code = 0 if form == "row" else FORMS.get(form) if type(form) is str else None
    if code is None:
        raise ValueError(f"form must be one of {sorted(FORMS)}; got {form!r}")
    if type(labels) is _Tensor and not escape:  # the common case: read in place
        out = _C.rrle_encode(labels, names, seps, code)
        if out is not NotImplemented:
            return out
    if isinstance(labels, (list, tuple)) and (not labels or isinstance(labels[0], (list, tuple))):
        rows = [list(r) for r in labels]
        if any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("labels must be an h x w grid: rows of different lengths")
        index: dict[str, int] = {}
        grid = [[index.setdefault(str(v), len(index)) for v in r] for r in rows]
        names = list(index)
        t = torch.tensor(grid, dtype=torch.long).reshape(len(rows), len(rows[0]) if rows else 0)
    else:
        if names is None:
            raise TypeError("rrle_encode needs names for an integer label grid")
        t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if t.dim() not in (2, 3):
            raise ValueError(f"labels must be (h, w) or (B, h, w); got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"labels must be integers indexing names; got {t.dtype}")
        t = t.to("cpu", torch.long).resolve_neg().contiguous()
        if type(t) is not torch.Tensor:
            t = t.as_subclass(torch.Tensor)
    names = [str(n) for n in names]
    if escape:
        names = [escape_label(n) for n in names]
    return _C.rrle_encode(t, names, seps, code)


def detect_dialect(text: str) -> str:
    """The dialect of :data:`DIALECTS` a text is written in (Text4Seg's when unsure)."""
    if "|" in text or "\n" in text:
        return "text4seg"
    if ";" in text or "," in text:
        return "semicolon" if (", " in text or "; " in text or " *" in text) else "compact"
    return "text4seg"


def _strip_tags(text: str, strict: bool, repairs: list[Repair]) -> str:
    if "<seg>" in text:
        text = text.split("<seg>", 1)[1]
        if "</seg>" in text:
            text = text.split("</seg>", 1)[0]
        elif strict:
            raise ValueError("fastvision.rrle_decode: the text opens <seg> but never closes it")
        else:
            repairs.append(Repair("text cut off before </seg>", -1, -1))
    elif "</seg>" in text:
        text = text.split("</seg>", 1)[0]
    return text


def _closest(label: str, names: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(label, names, n=1, cutoff=0.6)
    return match[0] if match else None


def rrle_decode(text, h: int, w: int, names=None, strict: bool = False, *, separators=None,
                form: str = "auto", unknown: str = "closest", background: int = 0, escape: bool = False):
    """Decodes an R-RLE text into ``(labels, names, report)``: labels an (h, w)
    int64 tensor indexing names, the :class:`DecodeReport`. A list of texts
    (decoded in parallel) gives labels (B, h, w) and a list of reports.

    ``names``: the known labels (indices into them); None takes the labels in
    order of first appearance. ``strict=True`` raises ValueError on any
    deviation from the format, naming the row and column. Tolerant (the
    default) repairs what models emit and reports it: separators without
    their spaces ("\\n", "|", "* 3", "*3"), rows whose counts do not sum to w
    (padded with the row's last label or cut), missing or extra rows, unknown
    labels (``unknown="closest"``: the closest known name, else names[background];
    ``"background"``: names[background]), text cut off before ``</seg>``;
    the dialects of :data:`DIALECTS` are detected when ``separators`` is None.
    ``form``: ``"auto"``, ``"row"``, ``"image"`` (runs over the raster order)
    or ``"none"`` (one label per patch, no counts). Text around ``<seg>...</seg>``
    is ignored.
    """
    # (Checked in the C++: h, w and background are integers, names str()-ed, non-empty and
    # distinct, background indexes them, a batch is a list or tuple of str.)
    code = _FORM_CODES.get(form) if type(form) is str else None
    if code is None:
        raise ValueError(f"form must be 'auto' or one of {sorted(FORMS)}; got {form!r}")
    if unknown not in _UNKNOWN:
        raise ValueError(f"unknown must be 'closest' or 'background'; got {unknown!r}")
    pre = None  # repairs made here (<seg> tags), per text
    if type(text) is str:
        batch, first = False, text
        if "<" in text:
            pre = [[]]
            text = first = _strip_tags(text, strict, pre[0])
    else:
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"text must be a str (or a list of str); got {type(text).__name__}")
        if any("<" in t for t in text if type(t) is str):
            pre = [[] for _ in text]
            text = [_strip_tags(t, strict, p) if type(t) is str else t for t, p in zip(text, pre)]
        batch, first = True, text[0] if text and type(text[0]) is str else ""
    if separators is None:  # one dialect per call: the first text's
        dialect = detect_dialect(first)
        seps = DIALECTS[dialect]
    else:
        dialect = separators if isinstance(separators, str) else "custom"
        seps = _as_separators(separators)
    if escape and names is not None:
        names = [escape_label(str(n)) for n in names]
    grid, names, extra, reps = _C.rrle_decode(text, h, w, names, background, seps, strict, code)
    if not (batch or pre or reps or extra or escape):  # the common call: one text, decoded as written
        return grid, names, DecodeReport(dialect, form, [])
    if escape:
        names = [unescape_label(n) for n in names]
        extra = [unescape_label(n) for n in extra]
    if not batch:
        grid = grid[None]
    reports = [DecodeReport(dialect, form, p) for p in pre] if pre else \
        [DecodeReport(dialect, form, []) for _ in range(len(text) if batch else 1)]
    for b, k, r, c, n in reps:
        reports[b].repairs.append(Repair(_REPAIRS[k], r, c, n))
    labels = grid
    if extra:  # labels outside names: map them (ids >= len(names) in the grid)
        K = len(names)
        lut = list(range(K))
        for k, label in enumerate(extra, start=K):
            where = (grid == k).nonzero()
            b, row, col = where[0].tolist() if len(where) else (0, -1, -1)
            if strict:
                raise ValueError(f"fastvision.rrle_decode: row {row}, column {col}: unknown label {label!r} "
                                 f"(known: {names[:8]}{'...' if len(names) > 8 else ''})")
            target = _closest(label, names) if unknown == "closest" else None
            lut.append(names.index(target) if target is not None else background)
            for bb in (grid == k).flatten(1).any(1).nonzero().flatten().tolist():
                rr, cc = (grid[bb] == k).nonzero()[0].tolist()
                reports[bb].repairs.append(Repair("unknown label", rr, cc, detail=f"{label!r} -> {names[lut[-1]]!r}"))
        labels = torch.tensor(lut, dtype=torch.long)[grid]
    if batch:
        return labels, names, reports
    return labels[0], names, reports[0]


class RRLEDecoder:
    """Streaming decoder: feed text chunks as a model generates them; each row is
    returned as soon as it is complete.

    >>> dec = RRLEDecoder(2, 3, names=["others", "cat"])
    >>> dec.feed("others *1| cat *2\\n oth")
    [(0, tensor([0, 1, 1]))]
    >>> dec.feed("ers *3\\n")
    [(1, tensor([0, 0, 0]))]
    >>> labels, names, report = dec.close()

    Rows are decoded with :func:`rrle_decode`'s rules (row-wise form), so the
    rows streamed and the result of :meth:`close` (the whole text decoded at
    once) agree. Text before ``<seg>`` is skipped and text after ``</seg>``
    ignored, as in one-shot decoding; ``seg_tags``: True waits for ``<seg>``,
    False reads the stream as descriptor text from its start, None (default)
    reads it as descriptor text once a first row with runs and no '<' is seen.
    """

    def __init__(self, h: int, w: int, names=None, strict: bool = False, *, separators=None,
                 unknown: str = "closest", background: int = 0, seg_tags: bool | None = None):
        self.h, self.w, self.strict = int(h), int(w), strict
        self.separators, self.unknown, self.background = separators, unknown, background
        self.names = None if names is None else [str(n) for n in names]
        self.seg_tags = seg_tags
        self._text = ""
        self._body_start: int | None = 0 if seg_tags is False else None
        self._done = False
        self._consumed = 0  # body characters already split into rows
        self._rows = 0
        self._found: list[str] = []  # names found so far (names=None)
        self._seps: Separators | None = None

    def _body(self) -> str:
        if self._body_start is None:
            i = self._text.find("<seg>")
            if i >= 0:
                self._body_start = i + len("<seg>")
            else:
                # Auto: plain descriptor text if its first row has runs ('*') and no tag ('<').
                first = min((j for j in (self._text.find(c) for c in "\n;") if j >= 0), default=-1)
                head = self._text[:first]
                if self.seg_tags or first < 0 or "<" in head or "*" not in head:
                    return ""
                self._body_start = 0
        body = self._text[self._body_start:]
        j = body.find("</seg>")
        if j >= 0:
            self._done = True
            body = body[:j]
        return body

    def feed(self, chunk: str) -> list[tuple[int, torch.Tensor]]:
        """Adds text; returns [(row index, labels (w,) int64)] for the rows it completed."""
        self._text += chunk
        body = self._body()
        if self._seps is None:
            if self.separators is not None:
                self._seps = _as_separators(self.separators)
            elif any(c in body for c in "\n|;,"):
                self._seps = DIALECTS[detect_dialect(body)]
            else:
                return []
        core = self._seps.row.strip(" ") or self._seps.row
        out = []
        while True:
            i = body.find(core, self._consumed)
            if i < 0:
                break
            row_text = body[self._consumed:i]
            self._consumed = i + len(core)
            if not row_text.strip() or self._rows >= self.h:
                continue  # blank rows are dropped, extra rows ignored (as in one-shot decoding)
            out.append((self._rows, self._decode_row(row_text)))
            self._rows += 1
        return out

    def _decode_row(self, row_text: str) -> torch.Tensor:
        seps = self._seps
        labels, names, _ = rrle_decode(row_text.lstrip(" ") + seps.end, 1, self.w, self.names, self.strict,
                                       separators=seps, form="row", unknown=self.unknown,
                                       background=self.background)
        if self.names is not None:
            return labels[0]
        index = {n: i for i, n in enumerate(self._found)}
        lut = torch.tensor([index.setdefault(n, len(index)) for n in names] or [0], dtype=torch.long)
        self._found = list(index)
        return lut[labels[0]]

    def close(self):
        """The whole text decoded at once: ``(labels, names, report)`` as :func:`rrle_decode`."""
        return rrle_decode(self._text, self.h, self.w, self.names, self.strict,
                           separators=self._seps if self.separators is not None else None,
                           unknown=self.unknown, background=self.background)


def semantic_descriptors(mask: torch.Tensor, grid) -> torch.Tensor:
    """Nearest downsampling of a label mask (..., H, W) to the grid (gh, gw):
    patch (i, j) takes the pixel at the patch's centre, ``floor((i + 0.5) * H / gh)``
    (PIL's NEAREST resize, which Text4Seg's data builders use; torch's
    'nearest-exact'). Any device; integer arithmetic, so no rounding surprises."""
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(np.asarray(mask))
    if mask.dim() < 2:
        raise ValueError(f"mask must be (..., H, W); got shape {tuple(mask.shape)}")
    H, W = mask.shape[-2:]
    if gh < 1 or gw < 1 or H < 1 or W < 1:
        raise ValueError(f"mask (H, W) = ({H}, {W}) and grid ({gh}, {gw}) must be positive")
    rows = (torch.arange(gh, device=mask.device) * 2 + 1) * H // (2 * gh)
    cols = (torch.arange(gw, device=mask.device) * 2 + 1) * W // (2 * gw)
    return mask.index_select(-2, rows).index_select(-1, cols)


def descriptors_to_mask(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest upsampling of a label grid (..., gh, gw) to size (H, W), as Text4Seg
    (``F.interpolate(mode='nearest')``: source index ``floor(i * (gh / H))`` in float32,
    so the result equals torch's bit for bit). Any device."""
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.dim() < 2:
        raise ValueError(f"labels must be (..., gh, gw); got shape {tuple(labels.shape)}")
    gh, gw = labels.shape[-2:]
    if H < 1 or W < 1 or gh < 1 or gw < 1:
        raise ValueError(f"labels (gh, gw) = ({gh}, {gw}) and size ({H}, {W}) must be positive")

    def index(n_in, n_out):
        if n_in == n_out:
            return torch.arange(n_out, device=labels.device)
        scale = torch.tensor(float(n_in), dtype=torch.float32) / n_out  # torch's float32 scale
        src = torch.floor(torch.arange(n_out, dtype=torch.float32) * scale).long().clamp_(max=n_in - 1)
        return src.to(labels.device)

    return labels.index_select(-2, index(gh, H)).index_select(-1, index(gw, W))


# Fake kernels (torch.compile, meta tensors): the text's length is data-dependent.
@torch.library.register_fake("fastvision::rrle_encode")
def _rrle_encode_fake(labels, names, name_offsets, run_sep, row_sep, count_sep, end, form):
    b = labels.shape[0] if labels.dim() == 3 else 1
    return (labels.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.uint8),
            labels.new_empty(b + 1, dtype=torch.long))


@torch.library.register_fake("fastvision::rrle_decode")
def _rrle_decode_fake(text, text_offsets, names, name_offsets, fill, h, w, run_sep, row_sep, count_sep, end, strict,
                      form):
    ctx = torch.library.get_ctx()
    b = text_offsets.shape[0] - 1
    return (text.new_empty((b, h, w), dtype=torch.long), text.new_empty(ctx.new_dynamic_size(), dtype=torch.uint8),
            text.new_empty(ctx.new_dynamic_size() + 1, dtype=torch.long),
            text.new_empty((ctx.new_dynamic_size(), 5), dtype=torch.long))
