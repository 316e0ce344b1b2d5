"""Loading the published checkpoints of the original models as they are.

:func:`load_official` takes a checkpoint file (or its loaded dict): a bare
state dict, or one wrapped under ``'model'`` / ``'state_dict'`` /
``'state_dict_ema'`` (the first present; ``key=`` picks another), with or
without DataParallel's ``module.`` prefix. Where a published layout names the
weights differently, its :class:`Layout` maps the keys (the layout whose keys
match the model best is taken; none where the names already are fastvision's,
which holds for NAT/DiNAT, Vim and STViT; :data:`LAYOUTS` lists the others: CCNet's
head and Deformable DETR's encoder, parts of published networks). It reports missing and unexpected
keys and shape mismatches by name, and refuses (``strict=True``) to load a
checkpoint with any.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

#: Where a published checkpoint keeps its weights, in the order looked for.
WRAPPERS = ("model", "state_dict", "state_dict_ema")


@dataclass(frozen=True)
class Layout:
    """A published layout: the model's weights are the keys under `prefix` (the rest
    belongs to other parts of the published network, e.g. its backbone), renamed by
    the regex substitutions `renames` (applied in order)."""
    name: str
    source: str
    prefix: str = ""
    renames: tuple[tuple[str, str], ...] = ()
    note: str = ""

    def convert(self, state: dict) -> tuple[dict, list[str]]:
        """(the model's keys, renamed; the keys left out as other parts of the network)."""
        out, other = {}, []
        for k, v in state.items():
            if not k.startswith(self.prefix):
                other.append(k)
                continue
            k = k[len(self.prefix):]
            for pattern, repl in self.renames:
                k = re.sub(pattern, repl, k)
            out[k] = v
        return out, other


_CCNET_SEG = "a segmentation network; only its head is this model"
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in [
    Layout("ccnet_official", "speedinghzl/CCNet (ResNet + RCCAModule: head.*, auxiliary dsn.*)", "head.",
           ((r"^cca\.gamma$", "cca.gamma.scale"),), note=_CCNET_SEG),
    Layout("mmseg_cchead", "open-mmlab/mmsegmentation CCHead (decode_head.*: FCNHead convs, conv_cat, conv_seg)",
           "decode_head.",
           ((r"^convs\.0\.conv\.", "conva.0."), (r"^convs\.0\.bn\.", "conva.1."),
            (r"^convs\.1\.conv\.", "convb.0."), (r"^convs\.1\.bn\.", "convb.1."),
            (r"^conv_cat\.conv\.", "bottleneck.0."), (r"^conv_cat\.bn\.", "bottleneck.1."),
            (r"^conv_seg\.", "bottleneck.3.")),
           note=_CCNET_SEG + "; mmseg's ConvModules use ReLU where CCNet (and fastvision) use "
                             "InPlaceABN's leaky ReLU (0.01): the weights load, the activations differ"),
    Layout("deformable_detr", "fundamentalvision/Deformable-DETR (the detector: backbone, transformer, heads)",
           "transformer.encoder.", note="a detector; only its transformer's encoder is this model"),
]}


@dataclass
class LoadReport:
    """What :func:`load_official` did: `loaded` keys, and by name what did not fit."""
    wrapper: str | None
    layout: str | None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    other_parts: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"checkpoint: weights under {self.wrapper!r}" if self.wrapper else "checkpoint: a bare state dict",
                 f"layout: {self.layout or 'fastvision names'}; {len(self.loaded)} tensors loaded"]
        if self.other_parts:
            lines.append(f"left out (other parts of the published network): {len(self.other_parts)} keys, "
                         f"e.g. {self.other_parts[:3]}")
        lines += [f"missing in the checkpoint: {k}" for k in self.missing]
        lines += [f"unexpected in the checkpoint: {k}" for k in self.unexpected]
        lines += [f"shape mismatch: {k}: checkpoint {list(a)}, model {list(b)}" for k, a, b in self.mismatched]
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def _unwrap(checkpoint: dict, key: str | None) -> tuple[dict, str | None]:
    if key is not None:
        if key not in checkpoint:
            raise KeyError(f"load_official: the checkpoint has no {key!r}; its keys: {sorted(checkpoint)[:10]}")
        return checkpoint[key], key
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None
    for k in WRAPPERS:
        if isinstance(checkpoint.get(k), dict):
            return checkpoint[k], k
    raise ValueError(f"load_official: neither a state dict nor one under {list(WRAPPERS)}; "
                     f"its keys: {sorted(map(str, checkpoint))[:10]}")


def load_official(model: nn.Module, checkpoint: str | dict, strict: bool = True, key: str | None = None,
                  layout: str | None = None) -> LoadReport:
    """Loads a published checkpoint of the original model into `model` (a fastvision model).

    Args:
        model: the model, built with the published configuration.
        checkpoint: a path (``torch.load``-ed on the CPU, weights only) or the loaded dict.
        strict: raise ``RuntimeError`` (listing every missing, unexpected and
            mismatched key by name) instead of loading a checkpoint that does not fit.
        key: the wrapper holding the weights, if not the first of ``'model'``,
            ``'state_dict'``, ``'state_dict_ema'`` (e.g. ``'state_dict_ema'`` when
            a file has both).
        layout: a :data:`LAYOUTS` name to force; by default the published layout
            (or fastvision's names) that matches the model's keys best.

    Returns:
        A :class:`LoadReport`.

    Example::

        >>> import torch
        >>> from fastvision.models import ccnet_head, load_official
        >>> head = ccnet_head(64, num_classes=3, channels=16)
        >>> published = {"head." + k: v for k, v in head.state_dict().items()}  # speedinghzl/CCNet
        >>> load_official(head, {"backbone.conv1.weight": torch.zeros(1), **published}).layout
        'ccnet_official'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_official: model must be a torch.nn.Module; got {type(model).__name__}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"load_official: layout must be one of {sorted(LAYOUTS)}; got {layout!r}")
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"load_official: checkpoint must be a path or a dict; got {type(checkpoint).__name__}")
    state, wrapper = _unwrap(checkpoint, key)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    target = model.state_dict()

    # fastvision's names first: a published layout is taken only where it matches more keys.
    candidates = [LAYOUTS[layout]] if layout else [Layout("", ""), *LAYOUTS.values()]
    converted = [(c, *c.convert(state)) for c in candidates]
    chosen, mapped, other = max(converted, key=lambda t: len(set(t[1]) & set(target)))

    # BatchNorm fills a missing num_batches_tracked itself (checkpoints of older torch, InPlaceABN).
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in target]
    mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in mapped.items()
                  if k in target and tuple(v.shape) != tuple(target[k].shape)]
    report = LoadReport(wrapper, chosen.name or None, missing=missing, unexpected=unexpected,
                        mismatched=mismatched, other_parts=other, note=chosen.note)
    if strict and not report.ok:
        raise RuntimeError(f"load_official: the checkpoint does not fit {type(model).__name__}:\n{report}")
    fits = {k: v for k, v in mapped.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    model.load_state_dict(fits, strict=False)
    report.loaded = sorted(fits)
    return report
