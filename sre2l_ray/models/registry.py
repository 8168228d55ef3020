"""Build models by name, so configs, checkpoints and the CLI speak the same names."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sre2l_ray.models.convnet import ConvNet, TinyBN


def _resnet(arch: str, small_stem: bool) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 224, weights: str | None = None, **_: object) -> nn.Module:
        import torchvision  # here, not at module level: it pulls in torch._dynamo (~1.5 s per fresh Ray worker)

        tv_weights = weights if (weights and not Path(weights).suffix and not small_stem) else None
        model = getattr(torchvision.models, arch)(weights=tv_weights)
        if small_stem:
            # 3x3 stride-1 stem, no max-pool: keeps spatial detail on <= 64 px inputs (CIFAR/Tiny-ImageNet recipes).
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if model.fc.out_features != num_classes:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model

    return build


def _convnet(num_classes: int, in_channels: int = 3, image_size: int = 32, depth: int = 3, width: int = 128, **_: object) -> nn.Module:
    return ConvNet(num_classes, in_channels, image_size, depth, width)


def _tiny(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 8, **_: object) -> nn.Module:
    return TinyBN(num_classes, in_channels, image_size, width=min(width, 16))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "convnet": _convnet,
    "tiny_bn": _tiny,
    "resnet18": _resnet("resnet18", small_stem=True),
    "resnet50": _resnet("resnet50", small_stem=True),
    "tv_resnet18": _resnet("resnet18", small_stem=False),
    "tv_resnet50": _resnet("resnet50", small_stem=False),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights from a local file without unpickling arbitrary objects; accepts our checkpoints too."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file '{p}' not found; check model.weights or squeeze.checkpoint")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (refused objects), RuntimeError (not a torch file), EOFError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise ValueError(f"weights file '{p}' is not a plain state dict loadable with weights_only=True ({first}); point it at a torch.save'd state dict") from None
    if not isinstance(state, dict):
        raise ValueError(f"weights file '{p}' holds a {type(state).__name__}, not a state dict; save model.state_dict()")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    depth: int = 3,
    width: int = 128,
    weights: str | None = None,
) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(list_models())}")
    model = _REGISTRY[name](
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, depth=depth, width=width, weights=weights
    )
    if weights and Path(weights).suffix:
        state = load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            raise ValueError(f"weights '{weights}' do not fit model '{name}' {misfit(model, state, num_classes, in_channels, image_size)}") from None
    return model


def misfit(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int, in_channels: int, image_size: int) -> str:
    """Why `state` does not load into `model`, told by the dimension that differs (class count, input channels,
    image size, or the architecture itself), with the fix: torch's own message lists shapes and blames nothing."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    extra = [k for k in state if k not in mine]
    if missing or extra:
        keys = ", ".join([f"missing '{k}'" for k in missing[:2]] + [f"unexpected '{k}'" for k in extra[:2]])
        return f"(another architecture: {keys}); use a checkpoint of this model with the configured depth and width"
    bad = [k for k, v in mine.items() if tuple(state[k].shape) != tuple(v.shape)]
    if not bad:
        return "(same shapes, other values refused); use a checkpoint saved from model.state_dict()"
    head = [k for k, v in mine.items() if v.ndim == 2][-1]  # the last Linear's weight: the classifier
    first_conv = next((k for k, v in mine.items() if v.ndim == 4), None)
    k = bad[0]
    got, want = list(state[k].shape), list(mine[k].shape)
    if head in bad and state[head].shape[0] != mine[head].shape[0]:
        n = int(state[head].shape[0])
        return f"with {num_classes} classes: they hold {n} classes ('{head}' is {list(state[head].shape)}, the model's {list(mine[head].shape)}); use a checkpoint trained on this dataset's classes"
    if k == first_conv and got[1:2] != want[1:2]:
        return f"with {in_channels} input channels: they take {got[1]} ('{k}' is {got}, the model's {want}); use a checkpoint trained on images with {in_channels} channels"
    if bad == [head]:
        got, want = list(state[head].shape), list(mine[head].shape)
        return (f"at {image_size} px: the classifier '{head}' takes {got[1]} features, the model at {image_size} px {want[1]}, "
                f"so they were trained at another image size; set data.image_size to the size they were trained at, "
                f"or use a checkpoint trained at {image_size} px")
    return f"('{k}' is {got} in the file, {want} in the model); set the model's depth and width to the checkpoint's"
