"""Recipe knobs of SRe2L's successors (issue #14), each pinned by its defining property: CDA's crop curriculum, EDC's
real-image start, class-aware BN statistics, EMA and stretched cosine, RDED's patch selection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sre2l_ray.config import RecoverConfig, SelectConfig, build_config
from sre2l_ray.data.augment import resized_crop
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.models import create_model
from sre2l_ray.stages.recover import (
    BNStatHooks,
    bn_layers,
    class_bn_statistics,
    crop_scale_at,
    initial_noise,
    plan_shards,
    prepare_teacher,
    real_init_images,
    real_init_indices,
    recover_shard,
    start_images,
)
from sre2l_ray.stages.relabel import ema_update, make_optimizer, train_student
from sre2l_ray.stages.select import candidate_boxes, candidate_indices, crop_scores, pick_crops, select_class
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


# --- CDA: crop-scale curriculum -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["step", "linear", "cosine"])
def test_crop_curriculum_starts_whole_and_reaches_the_minimum_at_the_milestone(schedule: str) -> None:
    scale = (0.08, 1.0)
    assert crop_scale_at(0, 100, scale, schedule, 0.5) == (1.0, 1.0)
    assert crop_scale_at(50, 100, scale, schedule, 0.5) == scale  # the milestone
    assert crop_scale_at(99, 100, scale, schedule, 0.5) == scale  # and it stays there
    lows = [crop_scale_at(it, 100, scale, schedule, 0.5)[0] for it in range(100)]
    assert all(a >= b for a, b in zip(lows, lows[1:])) and all(crop_scale_at(it, 100, scale, schedule, 0.5)[1] == 1.0 for it in range(100))
    expected_at_10 = {"step": 1.0, "linear": 0.08 + 0.92 * 0.8, "cosine": 0.08 + 0.92 * 0.5 * (1 + math.cos(math.pi * 0.2))}[schedule]
    assert crop_scale_at(10, 100, scale, schedule, 0.5)[0] == pytest.approx(expected_at_10)
    # CDA's own setting, milestone 1: the last iteration is one step short of the minimum.
    end = crop_scale_at(99, 100, scale, schedule, 1.0)[0]
    assert end == pytest.approx({"step": 1.0, "linear": 0.08 + 0.92 * 0.01, "cosine": 0.08 + 0.92 * 0.5 * (1 + math.cos(math.pi * 0.99))}[schedule])


def test_no_crop_schedule_is_the_configured_scale_every_step() -> None:
    assert all(crop_scale_at(it, 50, (0.3, 0.9), "none", 0.4) == (0.3, 0.9) for it in range(50))


def test_recover_uses_the_curriculum_scale() -> None:
    teacher = _teacher()
    # A step schedule with milestone 1 keeps whole-image views throughout: exactly a fixed crop_scale of (1, 1).
    step = RecoverConfig(ipc=1, iterations=4, crop_schedule="step", crop_milestone=1.0)
    whole = RecoverConfig(ipc=1, iterations=4, augment={"crop_scale": (1.0, 1.0)})
    shard = plan_shards(4, step)[0]
    with BNStatHooks(teacher) as hooks:
        a, _ = recover_shard(teacher, hooks, shard, step, seed=0, bounds=BOUNDS, image_shape=SHAPE)
        b, _ = recover_shard(teacher, hooks, shard, whole, seed=0, bounds=BOUNDS, image_shape=SHAPE)
        c, _ = recover_shard(teacher, hooks, shard, RecoverConfig(ipc=1, iterations=4), seed=0, bounds=BOUNDS, image_shape=SHAPE)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- EDC: real-image initialisation -------------------------------------------------------------------------


def test_real_init_picks_are_seeded_distinct_per_class_and_layout_free() -> None:
    labels = torch.tensor([0, 1, 2] * 7)[torch.randperm(21, generator=torch.Generator().manual_seed(0))]
    targets = [(c, k) for k in range(5) for c in range(3)]
    picks = real_init_indices(labels, targets, seed=3)
    assert torch.equal(labels[picks], torch.tensor([c for c, _ in targets]))
    for c in range(3):
        assert len(set(picks[labels[picks] == c].tolist())) == 5, "distinct within a class"
    assert torch.equal(picks, real_init_indices(labels, targets, seed=3))
    assert not torch.equal(picks, real_init_indices(labels, targets, seed=4))
    # Any shard layout (order, grouping) gets the same image for the same (class, ipc index).
    pairs = dict(zip(targets, picks.tolist()))
    shuffled = targets[::-1][:4]
    assert real_init_indices(labels, shuffled, seed=3).tolist() == [pairs[t] for t in shuffled]
    with pytest.raises(ValueError, match="lower recover.ipc"):
        real_init_indices(labels, [(0, 7)], seed=3)


def test_recover_starts_from_the_real_images() -> None:
    teacher, data = _teacher(), _real()
    cfg = RecoverConfig(ipc=2, iterations=1, lr=1e-6)
    shard = plan_shards(4, cfg)[0]
    init = real_init_images(data, shard, seed=5)
    index = real_init_indices(data.labels, shard.targets(), seed=5)
    assert torch.equal(init, data.normalize(data.images[index])) and torch.equal(data.labels[index], torch.tensor([c for c, _ in shard.targets()]))
    assert torch.equal(start_images(shard, 5, SHAPE, init), init)
    assert torch.equal(start_images(shard, 5, SHAPE), initial_noise(shard, 5, SHAPE))
    lo, hi = data.pixel_bounds("cpu")
    with BNStatHooks(teacher) as hooks:
        x, _ = recover_shard(teacher, hooks, shard, cfg, seed=5, bounds=(lo, hi), image_shape=SHAPE, init=init)
        noise, _ = recover_shard(teacher, hooks, shard, cfg, seed=5, bounds=(lo, hi), image_shape=SHAPE)
    # One Adam step moves a pixel by at most ~lr: the output is the start it was given.
    assert float((x - init).abs().max()) <= 2e-6
    assert float((noise - torch.maximum(torch.minimum(initial_noise(shard, 5, SHAPE), hi), lo)).abs().max()) <= 2e-6
    with pytest.raises(ValueError, match="one per shard target"):
        start_images(shard, 5, SHAPE, init[:1])


# --- EDC: class-aware BN statistics -------------------------------------------------------------------------


def _bn_inputs(teacher: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [bn.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().double())) for bn in bn_layers(teacher)]
    with torch.no_grad():
        teacher(x)
    for h in handles:
        h.remove()
    return seen


def test_class_bn_statistics_equal_a_direct_per_class_computation() -> None:
    teacher, data = _teacher(), _real()
    x = data.normalize(data.images)
    batches = [(x[i:i + 7], data.labels[i:i + 7]) for i in range(0, len(data), 7)]  # batches mix classes
    stats = class_bn_statistics(teacher, batches, 4)
    assert len(stats) == len(bn_layers(teacher)) == 2
    for c in range(4):
        for layer, feat in enumerate(_bn_inputs(teacher, x[data.labels == c])):
            var, mean = torch.var_mean(feat, dim=[0, 2, 3], unbiased=False)
            assert torch.allclose(stats[layer][0][c].double(), mean, atol=1e-5) and torch.allclose(stats[layer][1][c].double(), var, atol=1e-5)
    with pytest.raises(ValueError, match="no image of class 3"):
        class_bn_statistics(teacher, [(x[:3], data.labels[:3])], 4)


def _reference_loss(teacher, x, labels, stats, alpha: float, first: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for layer, (bn, feat) in enumerate(zip(bn_layers(teacher), _bn_inputs(teacher, x))):
        var, mean = torch.var_mean(feat, dim=[0, 2, 3], unbiased=False)
        glob = torch.linalg.vector_norm(mean - bn.running_mean.double()) + torch.linalg.vector_norm(var - bn.running_var.double())
        per = []
        for c in labels.unique().tolist():
            v_c, m_c = torch.var_mean(feat[labels == c], dim=[0, 2, 3], unbiased=False)
            per.append(torch.linalg.vector_norm(m_c - stats[layer][0][c].double()) + torch.linalg.vector_norm(v_c - stats[layer][1][c].double()))
        term = (1 - alpha) * glob + alpha * torch.stack(per).mean()
        total = total + (first if layer == 0 else 1.0) * term
    return total


def test_class_weight_zero_is_todays_loss_and_the_class_term_matches_its_definition() -> None:
    teacher, data = _teacher(), _real()
    stats = class_bn_statistics(teacher, [(data.normalize(data.images), data.labels)], 4)
    x = torch.randn(6, 1, 16, 16)
    labels = torch.tensor([0, 2, 0, 2, 2, 1])
    with BNStatHooks(teacher) as plain:
        teacher(x)
        today = plain.loss(10.0)
    with BNStatHooks(teacher, stats, class_weight=0.0) as hooks:
        hooks.set_labels(labels)
        teacher(x)
        assert torch.equal(hooks.loss(10.0), today)
    single = torch.full((6,), 2)
    for alpha, y in ((1.0, single), (0.5, labels), (1.0, labels)):
        with BNStatHooks(teacher, stats, class_weight=alpha) as hooks:
            hooks.set_labels(y)
            teacher(x)
            got = hooks.loss(10.0)
        assert torch.allclose(got.double(), _reference_loss(teacher, x, y, stats, alpha, 10.0), rtol=1e-4), (alpha, y)


def test_recover_with_class_statistics_runs_and_needs_them() -> None:
    teacher, data = _teacher(), _real()
    stats = class_bn_statistics(teacher, [(data.normalize(data.images), data.labels)], 4)
    cfg = RecoverConfig(ipc=1, iterations=30, r_bn=1.0, class_stats_weight=0.5)
    with BNStatHooks(teacher, stats, class_weight=cfg.class_stats_weight) as hooks:
        x, log = recover_shard(teacher, hooks, plan_shards(4, cfg)[0], cfg, seed=0, bounds=BOUNDS, image_shape=SHAPE, log_every=29)
    assert torch.isfinite(x).all() and log[-1]["loss_bn"] < log[0]["loss_bn"]
    with pytest.raises(ValueError, match="class_stats"):
        BNStatHooks(teacher, None, class_weight=0.5)


# --- RDED: real-patch selection ---------------------------------------------------------------------------


def _select_setup(factor: int = 1):
    teacher, data = _teacher(), _real(n=48)
    cls = 1
    images = data.images[candidate_indices(data.labels, cls, 8, seed=0)]
    cfg = SelectConfig(factor=factor, candidates=8, crops=3, crop_scale=(0.3, 1.0), batch_size=5)
    return teacher, data, cls, images, cfg


def test_select_keeps_each_candidates_best_crop_and_the_lowest_ce_candidates() -> None:
    teacher, data, cls, images, cfg = _select_setup()
    boxes = candidate_boxes(len(images), cfg.crops, cls, 9, cfg)
    # Brute force: every crop cut and scored on its own.
    ce = torch.empty(len(images), cfg.crops)
    with torch.no_grad():
        for j in range(len(images)):
            for k in range(cfg.crops):
                crop = resized_crop(images[j:j + 1].float(), boxes[j * cfg.crops + k:j * cfg.crops + k + 1], None, 16)
                ce[j, k] = F.cross_entropy(teacher(data.normalize(crop)), torch.tensor([cls]))
    best = {j: min(range(cfg.crops), key=lambda k: ce[j, k]) for j in range(len(images))}
    ranked = sorted(best, key=lambda j: ce[j, best[j]])[:3]
    scores = crop_scores(teacher, images, cls, boxes, cfg.crops, data.normalize, cfg.batch_size)
    assert torch.allclose(scores, ce, atol=1e-5)
    assert pick_crops(scores, 3).tolist() == [j * cfg.crops + best[j] for j in ranked]
    out = select_class(teacher, images, cls, 3, cfg, seed=9, normalize=data.normalize)
    expected = torch.cat([resized_crop(images[j:j + 1].float(), boxes[[j * cfg.crops + best[j]]], None, 16) for j in ranked])
    assert out.dtype == torch.uint8 and torch.equal(out, expected.round().clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match="raise recover.select.candidates"):
        select_class(teacher, images[:2], cls, 3, cfg, seed=9, normalize=data.normalize)


def test_select_is_deterministic_per_seed_and_free_of_the_scoring_batch() -> None:
    teacher, data, cls, images, cfg = _select_setup()
    a = select_class(teacher, images, cls, 2, cfg, seed=1, normalize=data.normalize)
    assert torch.equal(a, select_class(teacher, images, cls, 2, cfg.model_copy(update={"batch_size": 64}), seed=1, normalize=data.normalize))
    assert not torch.equal(a, select_class(teacher, images, cls, 2, cfg, seed=2, normalize=data.normalize))


def test_select_factor_two_tiles_the_downsampled_selected_crops() -> None:
    teacher, data, cls, images, cfg = _select_setup(factor=2)
    ipc = 2
    boxes = candidate_boxes(len(images), cfg.crops, cls, 4, cfg)
    rows = pick_crops(crop_scores(teacher, images, cls, boxes, cfg.crops, data.normalize, cfg.batch_size), ipc * 4)
    crops = resized_crop(images[rows // cfg.crops].float(), boxes[rows], None, 16)
    out = select_class(teacher, images, cls, ipc, cfg, seed=4, normalize=data.normalize)
    assert out.shape == (ipc, 1, 16, 16)
    for t, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for p in range(ipc):
            small = F.avg_pool2d(crops[t * ipc + p:t * ipc + p + 1], 2).round().clamp(0, 255).to(torch.uint8)
            assert torch.equal(out[p:p + 1, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8], small), (t, p)


def test_cluster_init_takes_one_image_per_look_distinct_and_seeded() -> None:
    """k-means on the teacher's features: three looks of a class, one seen 16 times, give one start image each (a
    random pick of 3 would mostly repeat the common look); picks are distinct and the same for the same seed."""
    from torch import nn

    from sre2l_ray.stages.select import cluster_class

    g = torch.Generator().manual_seed(0)
    looks = torch.zeros(3, 1, 8, 8)
    looks[0, :, :4, :4], looks[1, :, 4:, :4], looks[2, :, :, 4:] = 200, 200, 200
    group = torch.tensor([0] * 16 + [1, 1, 2, 2])
    images = (looks[group] + 20 * torch.rand(len(group), 1, 8, 8, generator=g)).to(torch.uint8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # features = the classifier's input = the pixels
    picks = cluster_class(teacher, images, label=0, ipc=3, seed=1, normalize=lambda x: x / 255)
    index = [int((images == p).flatten(1).all(1).nonzero()[0]) for p in picks]
    assert sorted(group[index].tolist()) == [0, 1, 2] and len(set(index)) == 3
    assert group[index[0]] == 0  # the largest cluster first
    assert torch.equal(picks, cluster_class(teacher, images, label=0, ipc=3, seed=1, normalize=lambda x: x / 255))
    with pytest.raises(ValueError, match="raise recover.select.candidates"):
        cluster_class(teacher, images[:2], label=0, ipc=3, seed=1, normalize=lambda x: x / 255)


def test_select_config_refuses_too_few_candidates() -> None:
    from sre2l_ray.config import ConfigError

    with pytest.raises(ConfigError, match="raise recover.select.candidates"):
        build_config({}, ["recover.method=select", "recover.ipc=10", "recover.select.candidates=39"])
    assert build_config({}, ["recover.method=select", "recover.ipc=10", "recover.select.candidates=40"]).recover.select.factor == 2


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


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "recipes").glob("*.yaml")))
def test_each_recipe_file_is_recognised_by_its_name(recipe: str) -> None:
    """MLflow runs are named after the recipe the knobs match (recipes.py); each configs/recipes/*.yaml over a dataset
    config is recognised as itself, also with its tuning changed (iterations), and with a knob changed it is not."""
    from sre2l_ray.config import load_config
    from sre2l_ray.recipes import recipe_name, run_title

    root = Path(__file__).resolve().parents[1] / "configs"
    files = [root / "fashion_mnist.yaml", root / "recipes" / f"{recipe}.yaml"]
    assert recipe_name(load_config(files)) == recipe
    assert run_title(load_config(files, ["recover.ipc=10", "recover.iterations=7"])) == f"fashion_mnist ipc10 {recipe}"
    other = "relabel.ema_decay=0.9" if recipe != "edc" else "relabel.ema_decay=null"
    assert recipe_name(load_config(files, [other])) not in ("sre2l", "cda", "edc", "rded")


def test_a_config_off_every_recipe_is_described_compactly() -> None:
    from sre2l_ray.recipes import recipe_name

    assert recipe_name(build_config({})) == "sre2l"
    assert recipe_name(build_config({"recover": {"init": "real"}, "relabel": {"ema_decay": 0.99}})) == "real-init+ema0.99"
    assert recipe_name(build_config({"recover": {"method": "select", "init": "real"}})) == "rded"  # select reads no init
    from sre2l_ray.recipes import run_title

    folder = build_config({"data": {"name": "imagefolder", "root": "data/gtsrb10"}, "recover": {"ipc": 10}})
    assert run_title(folder) == "gtsrb10 ipc10 sre2l"
