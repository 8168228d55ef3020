"""Which recipe of the SRe2L family a config runs, by its knobs: the name MLflow runs and `sre2l compare` show.

A recipe (configs/recipes/*.yaml) is defined by the knobs below, the ones that change what the method does;
iterations, learning rates and the like tune a recipe without making it another one. A config whose knobs match no
recipe gets a compact description of how it differs from SRe2L (e.g. `real-init+ema0.99`). tests/test_recipes_core.py
checks that every configs/recipes/*.yaml is recognised as its own file name.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from sre2l_ray.config import Config

# knob -> (SRe2L's value, short form of another value for descriptions)
KNOBS: dict[str, tuple[Any, str]] = {
    "recover.method": ("optimise", "{}"),
    "recover.init": ("noise", "{}-init"),
    "recover.crop_schedule": ("none", "{}-crops"),
    "recover.class_stats_weight": (0.0, "cls{:g}"),
    "relabel.ema_decay": (None, "ema{:g}"),
    "relabel.schedule_stretch": (1.0, "stretch{:g}"),
}
# Knobs that only an optimising recovery reads (recover.method=select picks real patches instead).
_OPTIMISE_ONLY = ("recover.init", "recover.crop_schedule", "recover.class_stats_weight")

RECIPES: dict[str, dict[str, Any]] = {
    "sre2l": {},  # every knob at SRe2L's value
    "cda": {"recover.crop_schedule": "cosine"},
    "edc": {"recover.init": "real", "recover.class_stats_weight": 0.5, "relabel.ema_decay": 0.99, "relabel.schedule_stretch": 2.0},
    "rded": {"recover.method": "select"},
}
"""Each recipe as its knobs that differ from SRe2L's."""


def _knob(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def knobs(cfg: Config) -> dict[str, Any]:
    """The config's knobs that differ from SRe2L's (those an optimising recovery reads, only when it optimises)."""
    out = {}
    for key, (default, _) in KNOBS.items():
        if cfg.recover.method == "select" and key in _OPTIMISE_ONLY:
            continue
        value = _knob(cfg, key)
        if value != default:
            out[key] = value
    return out


def recipe_name(cfg: Config) -> str:
    """`sre2l`, `cda`, `edc` or `rded` when the knobs match that recipe, else e.g. `real-init+ema0.99`."""
    mine = knobs(cfg)
    for name, recipe in RECIPES.items():
        if mine == {k: v for k, v in recipe.items() if not (cfg.recover.method == "select" and k in _OPTIMISE_ONLY)}:
            return name
    return "+".join(KNOBS[k][1].format(v) for k, v in mine.items())


def dataset_name(cfg: Config) -> str:
    """The dataset in words: torchvision's name, or for a folder of images or shards the folder's name
    (data/gtsrb10 -> gtsrb10, /data/imagenet-shards -> imagenet-shards)."""
    if cfg.data.name in ("imagefolder", "shards"):
        return PurePosixPath(cfg.data.root.rstrip("/")).name or cfg.data.name
    return cfg.data.name


def run_title(cfg: Config) -> str:
    """What a pipeline run is, in a few words: `fashion_mnist ipc10 edc`."""
    return f"{dataset_name(cfg)} ipc{cfg.recover.ipc} {recipe_name(cfg)}"
