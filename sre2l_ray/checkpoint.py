"""Checkpoints that carry their config, written atomically and read back without unpickling arbitrary objects."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from sre2l_ray.io import atomic_write_bytes


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Save tensors, state dicts and plain values (config as a dict) to `path` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint '{p}' not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - RuntimeError/EOFError (truncated), UnpicklingError (objects weights_only refuses)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:80]
        raise ValueError(f"checkpoint '{p}' is unreadable or truncated, or holds more than tensors ({first}); delete it to retrain") from None
