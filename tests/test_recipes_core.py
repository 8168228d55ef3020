"""Recipe knobs of SRe2L's successors (issue #14), each pinned by its defining property: CDA's crop curriculum, EDC's
real-image start, class-aware BN statistics, EMA and stretched cosine, RDED's patch selection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sre2l_ray.config import RecoverConfig, build_config
from sre2l_ray.data.augment import resized_crop
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.models import create_model
from sre2l_ray.stages.recover import prepare_teacher
from sre2l_ray.stages.relabel import ema_update, make_optimizer, train_student
from sre2l_ray.stages.training import lr_schedule

BOUNDS = (torch.full((1, 1, 1, 1), -1.0), torch.full((1, 1, 1, 1), 2.0))
SHAPE = (1, 16, 16)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("convnet", 4, 1, 16, depth=2, width=8)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(5):
            model(torch.rand(32, 1, 16, 16) * 2)
    return prepare_teacher(model, RecoverConfig())


def _real(n: int = 40, classes: int = 4, size: int = 16) -> ImageSet:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    return ImageSet(images, labels, [f"c{i}" for i in range(classes)], (0.5,), (0.25,))


# --- EDC: student EMA and stretched cosine ----------------------------------------------------------------


def test_one_ema_step_is_the_formula_for_params_and_a_copy_for_buffers() -> None:
    torch.manual_seed(0)
    ema, model = create_model("tiny_bn", 2, 1, 12), create_model("tiny_bn", 2, 1, 12)
    model.train()
    model(torch.randn(4, 1, 12, 12))  # moves the running statistics
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
    assert all(torch.equal(e, b) for e, b in zip(ema.buffers(), model.buffers()))


def test_stretch_one_is_the_plain_cosine_and_stretch_two_stops_halfway() -> None:
    def lrs(stretch: float) -> list[float]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        sched = lr_schedule(opt, "cosine", 10, stretch=stretch)
        out = [sched.get_last_lr()[0]]
        for _ in range(10):
            opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    assert lrs(1.0) == [0.2 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(11)]
    assert lrs(2.0)[-1] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 2)))
    cfg = build_config({"relabel": {"epochs": 1, "batch_size": 5, "schedule_stretch": 2.0}})
    _, sched = make_optimizer(cfg, torch.nn.Linear(2, 2), 10)
    assert sched.lr_lambdas[0](2) == pytest.approx(0.5)


def _toy() -> ImageSet:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(20) % 2
    images = (torch.rand(20, 1, 12, 12, generator=g) * 60).to(torch.uint8)
    images[labels == 1, :, :, :6] += 150
    return ImageSet(images, labels, ["dark", "bright"], (0.5,), (0.5,))


EMA_RELABEL = {"model": {"name": "tiny_bn"}, "epochs": 4, "batch_size": 5, "lr": 0.01, "ema_decay": 0.9, "augment": {"crop_scale": [0.9, 1.0]}}


def test_train_student_returns_the_ema_and_a_resumed_run_is_identical(tmp_path: Path) -> None:
    cfg = build_config({"relabel": EMA_RELABEL}, ["channels_last=false"])
    device = torch.device("cpu")
    whole = train_student(cfg, _toy(), None, device, tmp_path / "whole").state_dict()
    no_ema = build_config({"relabel": {**EMA_RELABEL, "ema_decay": None}}, ["channels_last=false"])
    plain = train_student(no_ema, _toy(), None, device, tmp_path / "plain").state_dict()
    assert not all(torch.equal(whole[k], plain[k]) for k in whole), "the EMA is returned, not the last weights"

    class Stop(Exception):
        pass

    def stop_after_two(epoch: int, _metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_student(cfg, _toy(), None, device, tmp_path / "resumed", on_epoch=stop_after_two)
    resumed = train_student(cfg, _toy(), None, device, tmp_path / "resumed").state_dict()
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
