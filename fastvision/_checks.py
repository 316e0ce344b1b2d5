"""Argument checks shared by the op wrappers, the references and the layers.

Every error names the argument and the form that was expected. Two audiences:

* public functions and layers (:func:`check_tensor`, :func:`per_axis`,
  :func:`as_int`, ...) raise ``TypeError`` / ``ValueError`` in the caller's
  words;
* direct calls of a registered op (:class:`OpArgs`), which torch.compile,
  torch.export and users make without the wrappers: every tensor and integer
  a kernel touches is checked against the op's schema before the Python
  (Triton, fake) kernels run; messages start ``fastvision.<op>: `` as the C++
  kernels' own checks do.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulate dtype of a kernel: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------
# Python scalars, numpy scalars and 0-d tensors


def as_int(value, name: str, minimum: int | None = None) -> int:
    """`value` as a Python int: ints, numpy integers and 0-d integer tensors; not bools."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor or array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def as_bool(value, name: str) -> bool:
    """`value` as a Python bool: bools, numpy bools and 0-d bool tensors."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor, array, numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return value
    raise TypeError(f"{name} must be a bool; got {value!r}")


def as_float(value, name: str) -> float:
    """`value` as a Python float: real numbers, numpy floats and 0-d tensors; not bools."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor or array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {value!r}")
    return float(value)


def _is_scalar(value) -> bool:
    """Not a sequence: Python and numpy scalars, 0-d tensors and arrays."""
    if isinstance(value, (tuple, list)):
        return False
    return getattr(value, "ndim", 0) == 0


def per_axis(value, nd: int, name: str, kind: type = int, minimum: int | None = None,
             context: str = "") -> tuple:
    """An int (or bool) or a sequence of `nd` of them, as a tuple of `nd`.

    Accepts numpy scalars and 0-d tensors wherever Python scalars are; a 1-d
    tensor or array counts as a sequence. `context` (e.g. "for na2d") ends
    the error message.
    """
    convert = as_bool if kind is bool else as_int
    what = "a bool" if kind is bool else "an int"
    where = f" {context}" if context else ""
    if _is_scalar(value):
        items = (value,) * nd
    else:
        try:
            items = tuple(value.tolist() if hasattr(value, "tolist") else value)
        except TypeError:
            items = None
        if items is None or len(items) != nd:
            raise TypeError(f"{name} must be {what} or a tuple of {nd} (one per spatial axis){where}; "
                            f"got {value!r}")
    try:
        out = tuple(convert(v, name) for v in items)
    except TypeError:
        raise TypeError(f"{name} must be {what} or a tuple of {nd} (one per spatial axis){where}; "
                        f"got {value!r}") from None
    if minimum is not None and any(v < minimum for v in out):
        raise ValueError(f"{name} must be >= {minimum} on every axis; got {value!r}")
    return out


# --------------------------------------------------------------------------
# Public functions: tensors in the caller's words


def check_tensor(name: str, t, *, ndim: int | None = None, shape: tuple | None = None,
                 dtypes: tuple | None = None, shape_doc: str | None = None) -> None:
    """Raises TypeError/ValueError naming `name` unless `t` is a tensor of the expected form."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        doc = f" {shape_doc}" if shape_doc else ""
        raise ValueError(f"{name} must be a {ndim}-D tensor{doc}; got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}); got {dtype_name(t.dtype)}")


def check_same_device(**tensors) -> None:
    """Raises ValueError if the given tensors (None skipped) are on different devices."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


# --------------------------------------------------------------------------
# Direct calls of registered ops


class OpArgs:
    """Checks the arguments of one direct call of ``fastvision::<op>``.

    Shapes are written with symbols (``("batch", "dim", "L")``): a symbol is
    bound by the first tensor that uses it and every later use must agree, so
    a call's tensors are checked against each other, not just one by one.
    Every tensor must be contiguous and on the first tensor's device.
    """

    def __init__(self, op: str):
        self.op = op
        self.sizes: dict[str, int] = {}
        self.device: torch.device | None = None

    def fail(self, message: str):
        # ValueError for every kind of bad argument, as the C++ kernels' checks raise.
        raise ValueError(f"fastvision.{self.op}: {message}")

    def tensor(self, name: str, t, shape: Sequence, dtypes: Sequence[torch.dtype],
               optional: bool = False) -> torch.Tensor | None:
        if t is None:
            if not optional:
                self.fail(f"{name} is required; got None")
            return None
        if not isinstance(t, torch.Tensor):
            self.fail(f"{name} must be a Tensor; got {type(t).__name__}")
        if t.dtype not in dtypes:
            names = [dtype_name(d) for d in dtypes]
            expected = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            self.fail(f"{name} must be {expected}; got {dtype_name(t.dtype)}")
        if self.device is None:
            self.device = t.device
        elif t.device != self.device:
            self.fail(f"{name} is on {t.device}, the other tensors on {self.device}")
        want = self.expected(shape)
        if t.dim() != len(shape) or any(w is not None and w != s for w, s in zip(want, t.shape)):
            self.fail(f"{name} must have shape ({', '.join(map(str, shape))}) = "
                      f"({', '.join('?' if w is None else str(w) for w in want)}); got {tuple(t.shape)}")
        for sym, size in zip(shape, t.shape):
            if isinstance(sym, str):
                self.sizes.setdefault(sym, int(size))
        if not t.is_contiguous():
            self.fail(f"{name} must be contiguous; got strides {t.stride()} for shape {tuple(t.shape)}")
        return t

    def expected(self, shape: Sequence) -> list:
        return [self.sizes.get(s) if isinstance(s, str) else s for s in shape]

    def integer(self, name: str, value, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{name} must be an int; got {value!r}")
        if not lo <= value <= hi:
            self.fail(f"{name} must be in [{lo}, {hi}]; got {value}")
        return value

    def ints(self, name: str, values, count: int, lo: int, hi: int) -> list:
        if not isinstance(values, (list, tuple)) or len(values) != count:
            self.fail(f"{name} must be a list of {count} ints (one per spatial axis); got {values!r}")
        return [self.integer(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(values)]

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)
