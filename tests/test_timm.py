"""timm integration: with timm installed, ``import fastvision.models`` registers every
builder of the registry as ``fastvision_<name>``, with its pretrained_cfg, and timm's
data-config helpers read it. timm imports torchvision, so these tests are marked
``torchvision``: tests/test_wheel_install.py runs them in its venv (torch 2.14.1 +
torchvision + timm, the built wheel).
"""

import pytest
import torch

pytestmark = pytest.mark.torchvision
timm = pytest.importorskip("timm")

import fastvision.models  # noqa: E402  (registers the builders with timm)
from fastvision.models.registry import MODELS  # noqa: E402
from fastvision.testing import assert_close  # noqa: E402


def test_every_builder_is_a_timm_model():
    names = set(timm.list_models("fastvision_*"))
    assert names == {f"fastvision_{n}" for n in MODELS}
    for name in MODELS:
        cfg = timm.models.get_pretrained_cfg(f"fastvision_{name}")
        assert cfg is not None and tuple(cfg.input_size) == tuple(MODELS[name].pretrained_cfg["input_size"])


@pytest.mark.parametrize("name", list(MODELS))
def test_create_model_builds_the_builder_with_its_cfg(name):
    entry = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(f"fastvision_{name}", **entry.small)
    torch.manual_seed(0)
    ours = entry.build_small()
    assert type(model) is type(ours)
    assert model.state_dict().keys() == ours.state_dict().keys()
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation"):
        want = entry.pretrained_cfg[key]
        assert (tuple(cfg[key]) if isinstance(want, tuple) else cfg[key]) == want, key
    # the model's own, not the published 1000 (an encoder without classes keeps its cfg's)
    assert cfg["num_classes"] == entry.small.get("num_classes", entry.pretrained_cfg["num_classes"])
    inputs = entry.example_input(1)
    model.eval(), ours.eval()
    with torch.no_grad():
        assert_close(model(*inputs), ours(*inputs))


def test_data_config_helpers_read_the_cfg():
    model = timm.create_model("fastvision_dinat_mini", num_classes=10)
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 0.875
    assert config["interpolation"] == "bicubic"
    assert tuple(config["mean"]) == (0.485, 0.456, 0.406) and tuple(config["std"]) == (0.229, 0.224, 0.225)
    transform = timm.data.create_transform(**config, is_training=False)
    from PIL import Image
    image = Image.new("RGB", (300, 260), (128, 64, 32))
    x = transform(image)
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([128, 64, 32]) / 255 - torch.tensor(config["mean"])) / torch.tensor(config["std"])
    assert_close(x[:, 100, 100], expected.float())
    vim = timm.data.resolve_data_config(model=timm.create_model("fastvision_vim_tiny", depth=2))
    assert vim["crop_pct"] == 0.9


def test_pretrained_true_says_how_to_load_official_weights():
    with pytest.raises(RuntimeError, match="load_official"):
        timm.create_model("fastvision_nat_mini", pretrained=True)
