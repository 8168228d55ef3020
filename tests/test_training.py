from pathlib import Path

import torch

from sre2l_ray.config import AugmentConfig, build_config
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.stages.evaluate import evaluate
from sre2l_ray.stages.relabel import kd_loss, online_soft_loss, train_student
from sre2l_ray.stages.training import epoch_indices, hard_label_loss, train_epoch


def _toy(n: int = 40) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = (torch.rand(n, 1, 12, 12, generator=g) * 60).to(torch.uint8)
    images[labels == 1, :, :, :6] += 150  # class 1 is bright on the left
    return ImageSet(images, labels, ["dark", "bright"], (0.5,), (0.5,))


def test_epoch_indices_split_ranks_evenly_and_replay() -> None:
    r0 = torch.cat(list(epoch_indices(11, 3, seed=0, epoch=2, rank=0, world=2)))
    r1 = torch.cat(list(epoch_indices(11, 3, seed=0, epoch=2, rank=1, world=2)))
    assert len(r0) == len(r1) == 5 and not set(r0.tolist()) & set(r1.tolist())
    assert torch.equal(r0, torch.cat(list(epoch_indices(11, 3, seed=0, epoch=2, rank=0, world=2))))


def test_kd_loss_is_zero_for_matching_logits_and_positive_otherwise() -> None:
    a = torch.randn(4, 5)
    assert float(kd_loss(a, a, 4.0)) < 1e-6
    assert float(kd_loss(a, -a, 4.0)) > 0


TOY_RELABEL = {"model": {"name": "tiny_bn"}, "epochs": 30, "batch_size": 10, "lr": 0.01, "augment": {"crop_scale": [0.9, 1.0], "flip": False}}


def test_training_learns_a_separable_toy_task(tmp_path: Path) -> None:
    cfg = build_config({"relabel": TOY_RELABEL}, ["channels_last=false"])
    student = train_student(cfg, _toy(), None, torch.device("cpu"), work_dir=tmp_path)
    assert evaluate(student, _toy(), channels_last=False)["top1"] >= 90


def test_relabel_seed_reseeds_only_the_student(tmp_path: Path) -> None:
    def weights(*overrides: str) -> torch.Tensor:
        cfg = build_config({"relabel": {**TOY_RELABEL, "epochs": 2}}, ["channels_last=false", *overrides])
        student = train_student(cfg, _toy(), None, torch.device("cpu"), work_dir=tmp_path / "_".join(overrides))
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    base = weights()
    assert torch.equal(base, weights("relabel.seed=0"))  # unset = the top-level seed
    assert not torch.allclose(base, weights("relabel.seed=1"))
    cfg = build_config({}, ["relabel.seed=1"])
    assert cfg.hash("seed", "data", "squeeze", "recover") == build_config({}, []).hash("seed", "data", "squeeze", "recover")


def test_online_soft_loss_uses_the_teachers_view() -> None:
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 2))
    views = torch.randn(3, 1, 12, 12)
    loss = online_soft_loss(teacher, 1.0)
    logits = teacher(views).detach()
    assert float(loss(logits, views, torch.arange(3), None)) < 1e-6


def test_hard_label_epoch_reduces_loss() -> None:
    from sre2l_ray.models import create_model

    data = _toy()
    model = create_model("tiny_bn", 2, 1, 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    aug = AugmentConfig(crop_scale=(0.9, 1.0), flip=False)
    losses = [train_epoch(model, opt, sched, data, hard_label_loss(data.labels), epoch=e, seed=0, batch_size=10, aug=aug, channels_last=False)["loss"] for e in range(8)]
    assert losses[-1] < losses[0]
