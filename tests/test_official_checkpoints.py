"""fastvision.models.load_official on generated checkpoints with the published key sets
of every model family: the names and shapes the original repositories' files hold
(written down independently of fastvision's modules: tests/test_nat_dinat.py,
tests/test_mamba_vim.py, tests/data/stvit_state_dict_shapes.json, tests/test_deform_attn.py,
and here for CCNet and mmseg's CCHead), wrapped as the published files wrap them.

NAT/DiNAT (bare state dicts), Vim and STViT (under 'model') need no key map; CCNet's
head does (speedinghzl/CCNet: the whole segmentation network, the head under
``head.`` with a bare ``gamma``; mmseg: ``decode_head.`` with FCNHead's names), and so
does Deformable DETR's encoder (the detector's file: ``transformer.encoder.``).
"""

import json
from pathlib import Path

import pytest
import torch
from test_deform_attn import published_encoder_state_dict
from test_mamba_vim import VIM_MIXER_KEYS, VIM_TINY_TOP_KEYS
from test_nat_dinat import CONFIGS, nat_model_keys

from fastvision.models import load_official
from fastvision.models.official import LAYOUTS
from fastvision.models.registry import MODELS

DATA = Path(__file__).parent / "data"


def _vim_tiny():
    keys = dict(VIM_TINY_TOP_KEYS)
    for i in range(24):
        keys.update({f"layers.{i}.mixer.{k}": v for k, v in VIM_MIXER_KEYS.items()})
        keys[f"layers.{i}.norm.weight"] = (192,)
    return keys


def _bn(prefix, c, tracked=True):
    keys = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    return {**keys, f"{prefix}.num_batches_tracked": ()} if tracked else keys


def ccnet_official_keys(in_ch=2048, out=512, classes=19):
    """speedinghzl/CCNet's ResNet + RCCAModule(2048, 512, classes) state dict (head
    and a few of the other parts): InPlaceABNSync keeps no num_batches_tracked, and
    CrissCrossAttention's gamma is a bare (1,) parameter."""
    inter = in_ch // 4
    keys = {"head.conva.0.weight": (inter, in_ch, 3, 3), **_bn("head.conva.1", inter, False),
            "head.cca.query_conv.weight": (inter // 8, inter, 1, 1), "head.cca.query_conv.bias": (inter // 8,),
            "head.cca.key_conv.weight": (inter // 8, inter, 1, 1), "head.cca.key_conv.bias": (inter // 8,),
            "head.cca.value_conv.weight": (inter, inter, 1, 1), "head.cca.value_conv.bias": (inter,),
            "head.cca.gamma": (1,),
            "head.convb.0.weight": (inter, inter, 3, 3), **_bn("head.convb.1", inter, False),
            "head.bottleneck.0.weight": (out, in_ch + inter, 3, 3), **_bn("head.bottleneck.1", out, False),
            "head.bottleneck.3.weight": (classes, out, 1, 1), "head.bottleneck.3.bias": (classes,)}
    keys.update({"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64, False), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "dsn.0.weight": (512, 1024, 3, 3), "dsn.3.weight": (classes, 512, 1, 1)})
    return keys


def mmseg_cchead_keys(in_ch=2048, channels=512, classes=19):
    """mmseg's CCHead (FCNHead, num_convs=2, concat_input) in an EncoderDecoder."""
    inter = channels
    return {"decode_head.convs.0.conv.weight": (inter, in_ch, 3, 3), **_bn("decode_head.convs.0.bn", inter),
            "decode_head.cca.query_conv.weight": (inter // 8, inter, 1, 1),
            "decode_head.cca.query_conv.bias": (inter // 8,),
            "decode_head.cca.key_conv.weight": (inter // 8, inter, 1, 1), "decode_head.cca.key_conv.bias": (inter // 8,),
            "decode_head.cca.value_conv.weight": (inter, inter, 1, 1), "decode_head.cca.value_conv.bias": (inter,),
            "decode_head.cca.gamma.scale": (1,),
            "decode_head.convs.1.conv.weight": (inter, inter, 3, 3), **_bn("decode_head.convs.1.bn", inter),
            "decode_head.conv_cat.conv.weight": (channels, in_ch + inter, 3, 3),
            **_bn("decode_head.conv_cat.bn", channels),
            "decode_head.conv_seg.weight": (classes, channels, 1, 1), "decode_head.conv_seg.bias": (classes,),
            "backbone.stem.0.weight": (32, 3, 3, 3), "auxiliary_head.convs.0.conv.weight": (256, 1024, 3, 3)}


def deformable_detr_keys():
    """Deformable DETR's r50 checkpoint (under 'model'): the encoder's entries and a few
    of the detector's other parts."""
    keys = {k: tuple(v.shape) for k, v in published_encoder_state_dict().items()}
    keys.update({"transformer.level_embed": (4, 256), "backbone.0.body.conv1.weight": (64, 3, 7, 7),
                 "transformer.decoder.layers.0.cross_attn.value_proj.weight": (256, 256),
                 "query_embed.weight": (300, 512), "class_embed.0.weight": (91, 256)})
    return keys


def _nat(builder):
    _, depths, heads, dim, mlp, _, ls = CONFIGS[builder]
    return lambda: nat_model_keys(depths, heads, dim, mlp, layer_scale=ls is not None)


def _stvit(name):
    return lambda: {k: tuple(v) for k, v in json.loads((DATA / "stvit_state_dict_shapes.json").read_text())[name].items()}


# (builder name, published key set, how the published file wraps it, the layout mapped, builder kwargs)
PUBLISHED = [(b.__name__, _nat(b), None, None, {}) for b in CONFIGS]
PUBLISHED += [("vim_tiny", _vim_tiny, "model", None, {})]
PUBLISHED += [(n, _stvit(n), "model", None, {}) for n in ("stvit_small", "stvit_base", "stvit_large")]
PUBLISHED += [("ccnet_head", ccnet_official_keys, None, "ccnet_official", dict(in_channels=2048, num_classes=19)),
              ("ccnet_head", mmseg_cchead_keys, "state_dict", "mmseg_cchead", dict(in_channels=2048, num_classes=19))]
PUBLISHED += [("deformable_encoder", lambda: deformable_detr_keys(), "model", "deformable_detr", {})]


def test_every_family_has_a_published_key_set():
    covered = {MODELS[name].builder.__module__ for name, *_ in PUBLISHED}
    families = {e.builder.__module__ for e in MODELS.values()}
    assert families <= covered, f"families without a published key set here: {sorted(families - covered)}"
    assert {layout for *_, layout, _ in PUBLISHED if layout} == set(LAYOUTS), "a layout without a test"


@pytest.mark.filterwarnings("ignore:for .*num_batches_tracked. copying from a non-meta")
@pytest.mark.parametrize("name, keys, wrapper, layout, kwargs", PUBLISHED,
                         ids=[f"{p[0]}-{p[3] or 'same-names'}" for p in PUBLISHED])
def test_published_key_set_loads(name, keys, wrapper, layout, kwargs):
    with torch.device("meta"):
        model = MODELS[name].builder(**kwargs)
    state = {k: torch.empty(v, device="meta") for k, v in keys().items()}
    checkpoint = {wrapper: state, "epoch": 300} if wrapper else state
    report = load_official(model, checkpoint)
    assert report.ok and report.layout == layout and report.wrapper == wrapper
    assert len(report.loaded) + len(report.other_parts) == len(state)


def _small_ccnet_checkpoint(keys):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v, generator=g) if v else torch.tensor(7) for k, v in keys.items()}


@pytest.mark.parametrize("layout, keys, renamed", [
    ("ccnet_official", lambda: ccnet_official_keys(64, 32, 5),
     {"conva.1.running_var": "head.conva.1.running_var", "cca.gamma.scale": "head.cca.gamma",
      "bottleneck.3.weight": "head.bottleneck.3.weight"}),
    ("mmseg_cchead", lambda: mmseg_cchead_keys(64, 16, 5),
     {"conva.0.weight": "decode_head.convs.0.conv.weight", "convb.1.running_mean": "decode_head.convs.1.bn.running_mean",
      "bottleneck.0.weight": "decode_head.conv_cat.conv.weight", "bottleneck.1.bias": "decode_head.conv_cat.bn.bias",
      "bottleneck.3.bias": "decode_head.conv_seg.bias", "cca.value_conv.weight": "decode_head.cca.value_conv.weight"}),
])
def test_layout_maps_each_tensor_to_its_place(layout, keys, renamed):
    """Values, not only names: each published tensor lands in the parameter it is."""
    head = MODELS["ccnet_head"].builder(in_channels=64, num_classes=5, channels=32 if layout == "ccnet_official" else 16)
    state = _small_ccnet_checkpoint(keys())
    report = load_official(head, state)
    assert report.layout == layout and report.ok
    ours = head.state_dict()
    for our_key, published_key in renamed.items():
        torch.testing.assert_close(ours[our_key], state[published_key].reshape(ours[our_key].shape))
    # the loaded head runs
    assert head.eval()(torch.randn(1, 64, 6, 5)).shape == (1, 5, 6, 5)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_wrappers_and_dataparallel_prefix(wrapper, prefix, tmp_path):
    torch.manual_seed(0)
    source = MODELS["nat_mini"].build_small()
    state = {prefix + k: v.clone() for k, v in source.state_dict().items()}
    checkpoint = {wrapper: state, "optimizer": {}, "epoch": 3} if wrapper else state
    torch.save(checkpoint, tmp_path / "published.pth")
    target = MODELS["nat_mini"].build_small()
    report = load_official(target, tmp_path / "published.pth")
    assert report.ok and report.wrapper == wrapper and report.layout is None
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v)


def test_ema_weights_when_asked():
    source = MODELS["nat_mini"].build_small()
    ema = {k: v + 1 for k, v in source.state_dict().items()}
    target = MODELS["nat_mini"].build_small()
    load_official(target, {"state_dict": source.state_dict(), "state_dict_ema": ema}, key="state_dict_ema")
    torch.testing.assert_close(target.head.bias, ema["head.bias"])


def test_mismatches_are_reported_by_name():
    model = MODELS["nat_mini"].build_small()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.zeros(1000, state["head.weight"].shape[1])  # a 1000-class head
    del state["norm.bias"]
    state["levels.0.blocks.0.attn.bogus"] = torch.zeros(3)
    with pytest.raises(RuntimeError) as err:
        load_official(model, {"model": state})
    message = str(err.value)
    assert "shape mismatch: head.weight: checkpoint [1000, 512], model [10, 512]" in message
    assert "missing in the checkpoint: norm.bias" in message
    assert "unexpected in the checkpoint: levels.0.blocks.0.attn.bogus" in message
    before = model.head.weight.clone()
    report = load_official(model, {"model": state}, strict=False)
    assert not report.ok and [m[0] for m in report.mismatched] == ["head.weight"]
    torch.testing.assert_close(model.head.weight, before)  # a mismatched tensor is not loaded
    assert "norm.bias" in report.missing and "levels.0.blocks.0.attn.bogus" in report.unexpected
    assert "head.weight" in str(report)


def test_bad_arguments():
    model = MODELS["nat_mini"].build_small()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_official(object(), {})
    with pytest.raises(ValueError, match="neither a state dict nor one under"):
        load_official(model, {"epoch": 3})
    with pytest.raises(KeyError, match="no 'state_dict_ema'"):
        load_official(model, {"model": {}}, key="state_dict_ema")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_official(model, {}, layout="nope")
