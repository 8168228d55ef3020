from pathlib import Path

import pytest
import torch

from sre2l_ray.models import create_model, list_models


@pytest.mark.parametrize("name, size, channels", [("convnet", 28, 1), ("tiny_bn", 32, 3), ("resnet18", 32, 3), ("resnet50", 32, 3), ("tv_resnet18", 64, 3)])
def test_models_classify_their_inputs(name: str, size: int, channels: int) -> None:
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size, depth=3, width=8).eval()
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_small_stem_keeps_resolution() -> None:
    small = create_model("resnet18", 10, image_size=32)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of .*convnet"):
        create_model("vgg", 10)
    assert "tv_resnet50" in list_models()


def test_local_weights_load_and_mismatch_is_explained(tmp_path: Path) -> None:
    src = create_model("convnet", 10, 1, 28, depth=2, width=8)
    path = tmp_path / "w.pt"
    torch.save({"model": src.state_dict()}, path)
    loaded = create_model("convnet", 10, 1, 28, depth=2, width=8, weights=str(path))
    assert torch.equal(loaded.classifier.weight, src.classifier.weight)
    with pytest.raises(ValueError, match="do not fit model 'convnet' with 5 classes"):
        create_model("convnet", 5, 1, 28, depth=2, width=8, weights=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("convnet", 10, 1, 28, weights=str(tmp_path / "missing.pt"))
