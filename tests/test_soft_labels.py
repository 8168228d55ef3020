"""Precomputed soft labels on real Fashion-MNIST: replayed views equal generated views bit for bit (CutMix included),
stored top-k equals the teacher recomputed on the replayed views, the loss matches online KD, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sre2l_ray.config import load_config
from sre2l_ray.data.datasets import load_split
from sre2l_ray.pipeline import run_pipeline, run_squeeze
from sre2l_ray.teacher import load_teacher
from sre2l_ray.stages.relabel import kd_loss, train_student
from sre2l_ray.stages.soft_labels import (
    PrecomputedSoftLoss,
    SoftLabelStore,
    generate_soft_labels,
    render_label_views,
    soft_targets,
    spec_from_config,
    storage_report,
)

ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("soft")
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [f"output_dir={out}", f"data.root={ROOT / 'data'}", "ray.enabled=false", "relabel.cutmix=0.5", "relabel.topk=3", "relabel.epochs=2",
         "relabel.temperature=4.0"],  # the checks below are written for T 4 (the recipe's T is not what is tested)
    )
    run_squeeze(cfg)
    data = load_split(cfg.data.model_copy(update={"train_limit": 50}), train=True)
    return cfg, data, load_teacher(cfg, DEV)


def test_replay_is_bit_exact_and_matches_teacher(setup, tmp_path: Path) -> None:
    cfg, data, teacher = setup
    spec = spec_from_config(cfg, data, "test")
    store = SoftLabelStore(tmp_path / "labels", spec)
    assert generate_soft_labels(teacher, data, store, range(cfg.relabel.epochs), batch_size=16) == [0, 1]
    replay = PrecomputedSoftLoss(store, DEV)
    seen = []

    def recording_loss(logits, views, index, plan):
        out = replay(logits, views, index, plan)
        seen.append((replay.epoch, index.clone(), views.detach().clone(), bool(plan.mix_on.any())))
        return out

    train_student(cfg, data, teacher, DEV, tmp_path / "student", loss=recording_loss)
    assert [e for e, *_ in seen] == [0] * 5 + [1] * 5 and any(mixed for *_, mixed in seen)
    for epoch, index, views, _ in seen:
        # The pixels the student trained on are the pixels the teacher labelled (other batch composition).
        assert torch.equal(views, render_label_views(data, spec, epoch, index))
        stored = store.read_epoch(epoch)
        with torch.no_grad():
            logits = teacher(views.contiguous(memory_format=torch.channels_last)).float()
        top = logits.topk(3, dim=1)
        assert torch.equal(top.indices, stored["classes"][index])
        assert torch.allclose(top.values.half().float(), stored["values"][index].float(), atol=2e-3)
        assert torch.allclose(torch.logsumexp(logits / cfg.relabel.temperature, 1), stored["lse"][index], atol=1e-4)


def test_targets_and_loss_match_online_kd(setup, tmp_path: Path) -> None:
    cfg, data, teacher = setup
    full_cfg = cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update={"topk": None})})
    for c, k in ((full_cfg, 10), (cfg, 3)):
        store = SoftLabelStore(tmp_path / "labels", spec_from_config(c, data, "test"))
        generate_soft_labels(teacher, data, store, [0])
        lab = store.read_epoch(0)
        assert lab["values"].dtype == torch.float16 and lab["values"].shape == (len(data), k)
        index = torch.arange(20)
        views = render_label_views(data, store.spec, 0, index)
        with torch.no_grad():
            t_logits = teacher(views).float()
        target = soft_targets(lab["values"][index], lab["classes"][index], lab["lse"][index], 4.0, 10)
        exact = torch.softmax(t_logits / 4.0, 1)
        assert torch.allclose(target.sum(1), torch.ones(20), atol=1e-5)
        assert torch.allclose(target.gather(1, lab["classes"][index]), exact.gather(1, lab["classes"][index]), atol=1e-3)
        student_logits = torch.randn(20, 10)
        got = PrecomputedSoftLoss(store, DEV)(student_logits, views, index, store.spec.plan(0, index))
        want = kd_loss(student_logits, t_logits, 4.0)
        if k == 10:
            assert abs(float(got) - float(want)) < 1e-3  # full outputs: the same loss as online relabel
        else:
            # Top-k: the KL to the rebuilt target, whose tail is flat: the mass the teacher gave the other classes.
            rest = torch.ones_like(target, dtype=torch.bool).scatter_(1, lab["classes"][index], False)
            tail = target[rest].view(20, 7)
            assert torch.allclose(tail, tail[:, :1].expand(-1, 7))
            assert torch.allclose(tail.sum(1), (exact * rest).sum(1), atol=1e-3)
            ref = torch.nn.functional.kl_div(torch.log_softmax(student_logits / 4.0, 1), target, reduction="batchmean")
            assert abs(float(got) - float(ref)) < 1e-6 and abs(float(got) - float(want)) < 0.5 * float(want)
    rep = storage_report(store, 1)
    assert rep["bytes"] > 0 and rep["full_fp16_bytes"] == len(data) * 10 * 2


def test_other_settings_are_refused_and_resume_fills_gaps(setup, tmp_path: Path) -> None:
    cfg, data, teacher = setup
    store = SoftLabelStore(tmp_path / "labels", spec_from_config(cfg, data, "test"))
    assert generate_soft_labels(teacher, data, store, [0]) == [0]
    assert generate_soft_labels(teacher, data, store, range(2)) == [1]  # only the missing epoch
    other = cfg.model_copy(update={"seed": 7})
    with pytest.raises(ValueError, match="match no stored soft-label epoch"):
        train_student(other, data, teacher, DEV, tmp_path / "s", loss=PrecomputedSoftLoss(store, DEV))
    store.path(1).write_bytes(store.path(1).read_bytes()[:40])
    with pytest.raises(FileNotFoundError, match="epoch 1 missing or unreadable.*regenerate"):
        store.read_epoch(1)


@pytest.mark.slow
def test_pipeline_relabel_with_precomputed_labels(tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [f"output_dir={tmp_path}", f"data.root={ROOT / 'data'}", "ray.enabled=false", "relabel.soft_labels=precomputed", "relabel.cutmix=0.5"],
    )
    results = run_pipeline(cfg)
    assert set(results["students"]) == {"condensed", "random_soft", "random_hard", "condensed_hard"}
    files = sorted((tmp_path / "students" / "condensed" / "seed0" / "soft_labels").rglob("epoch-*.parquet"))
    assert len(files) == cfg.relabel.epochs
    assert not (tmp_path / "students" / "random_hard" / "seed0" / "soft_labels").exists()  # hard labels need no teacher outputs


def _label_as_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One DDP rank (a process of its own, gloo) running Ray Train's precomputed-label step on a tiny set."""
    import json

    import torch.distributed as dist

    from sre2l_ray.data.datasets import ImageSet
    from sre2l_ray.distributed.train import _precomputed_loss
    from sre2l_ray.models import create_model
    from sre2l_ray.stages.relabel import freeze

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={out}", "relabel.epochs=4", "relabel.soft_labels=precomputed", "evaluate.batch_size=5"])
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(10), [str(c) for c in range(10)], (0.5,), (0.5,))
    torch.manual_seed(0)
    teacher = freeze(create_model("tiny_bn", 10, 1, 8))
    calls: list[int] = []
    teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    loss = _precomputed_loss(cfg, data, teacher, {"dir": f"{out}/labels", "source": "test"}, rank, world)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"forwards": len(calls), "epochs": sorted(loss.store.done_epochs())}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_share_the_labelling_and_wait_for_each_other(tmp_path: Path) -> None:
    """Under DDP each rank labels the epochs e with e % world == rank (rank 0 used to label them all while the others
    waited in a 30-minute barrier, too short for ImageNet), and every rank starts training only once all exist."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_label_as_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["forwards"] == 2 * 2  # its 2 of the 4 epochs, 10 views in teacher batches of 5
        assert seen["epochs"] == [0, 1, 2, 3]  # the other rank's epochs were there before it went on
