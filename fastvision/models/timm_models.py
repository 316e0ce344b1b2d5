"""timm registration: every builder of :data:`fastvision.models.registry.MODELS` as
``timm.create_model("fastvision_<name>")``, with its ``pretrained_cfg``.

Done by ``import fastvision.models`` when timm is installed (:func:`register`).
The models carry ``pretrained_cfg`` and ``default_cfg`` (input size, mean/std,
crop, interpolation, classes), so that timm's data helpers
(``timm.data.resolve_model_data_config``, ``create_transform``) configure the
published evaluation transform. fastvision downloads no weights:
``pretrained=True`` raises; load a published file with
:func:`fastvision.models.load_official`.
"""

from __future__ import annotations

import sys

PREFIX = "fastvision_"


def _make(name: str, entry):
    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        if pretrained:
            raise RuntimeError(f"timm.create_model({PREFIX + name!r}, pretrained=True): fastvision does not "
                               f"download weights; build it, then fastvision.models.load_official(model, path)")
        kwargs.pop("cache_dir", None)  # timm's download options, meaningless here
        cfg = dict(entry.pretrained_cfg)
        if isinstance(pretrained_cfg, dict):
            cfg.update(pretrained_cfg)
        elif pretrained_cfg is not None and hasattr(pretrained_cfg, "to_dict"):
            cfg.update(pretrained_cfg.to_dict())
        cfg.update(pretrained_cfg_overlay or {})
        if "num_classes" in kwargs:
            cfg["num_classes"] = kwargs["num_classes"]
        model = entry.builder(**kwargs)
        model.pretrained_cfg = model.default_cfg = {**cfg, "architecture": PREFIX + name}
        return model

    create.__name__ = create.__qualname__ = PREFIX + name
    create.__module__ = __name__
    create.__doc__ = f"fastvision.models.{name} for timm.create_model ({entry.builder.__doc__ or ''})."
    return create


def register() -> list[str]:
    """Registers every fastvision model builder with timm (once); returns their timm names."""
    from timm.models import is_model, register_model

    from .registry import MODELS
    module = sys.modules[__name__]
    names = []
    for name, entry in MODELS.items():
        fn = _make(name, entry)
        names.append(fn.__name__)
        if is_model(fn.__name__):
            continue
        setattr(module, fn.__name__, fn)
        # timm reads the module's default_cfgs when registering: its pretrained_cfg registry.
        default_cfgs[fn.__name__] = dict(entry.pretrained_cfg)
        register_model(fn)
    return names


default_cfgs: dict[str, dict] = {}
