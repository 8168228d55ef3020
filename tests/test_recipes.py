"""The SRe2L family's recipes (configs/recipes/*.yaml) end to end on the tiny config: in-process, and on Ray actors
and Ray Train with the same images and students."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sre2l_ray.config import load_config
from sre2l_ray.pipeline import run_pipeline, synthetic_store

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml"))


def _cfg(recipe: str, out: Path, *extra: str):
    return load_config(
        [ROOT / "configs/tiny.yaml", ROOT / "configs/recipes" / f"{recipe}.yaml"],
        [f"output_dir={out}", f"data.root={ROOT / 'data'}", "tracking.enabled=false", "ray.enabled=false",
         "recover.select.candidates=8", *extra],
    )


def test_every_named_recipe_is_shipped() -> None:
    assert RECIPES == ["cda", "edc", "rded", "sre2l"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_end_to_end(recipe: str, tmp_path: Path) -> None:
    cfg = _cfg(recipe, tmp_path, "recover.iterations=30")  # the recipes' own counts (up to 1000) take longer
    results = run_pipeline(cfg)
    assert set(results["students"]) == {"condensed", "condensed_hard", "random_soft", "random_hard"}
    assert "ior" in results and "hlr" in results
    classes = json.loads((tmp_path / "synthetic" / "manifest.json").read_text())["classes"]
    x, y = synthetic_store(cfg, classes).load()
    assert x.shape == (10 * cfg.recover.ipc, 1, 28, 28) and torch.equal(y.bincount(), torch.full((10,), cfg.recover.ipc))
    assert (tmp_path / "class_stats.pt").is_file() == (cfg.recover.class_stats_weight > 0)


def test_real_init_starts_from_the_picked_training_images(tmp_path: Path) -> None:
    """init=real with a learning rate too small to move a pixel by 1/255: the saved images are the real picks."""
    from sre2l_ray.data.datasets import load_split
    from sre2l_ray.stages.recover import plan_shards, real_init_indices

    cfg = _cfg("edc", tmp_path, "recover.lr=1.0e-9", "recover.iterations=2", "recover.class_stats_weight=0.0", "evaluate.baselines=false")
    run_pipeline(cfg)
    train = load_split(cfg.data, train=True)
    targets = [t for s in plan_shards(10, cfg.recover) for t in s.targets()]
    picks = real_init_indices(train.labels, targets, cfg.seed)
    store = synthetic_store(cfg, train.classes)
    for (c, k), i in zip(targets, picks):
        from torchvision.io import decode_png

        saved = decode_png(torch.frombuffer(bytearray(store.image_path(c, k).read_bytes()), dtype=torch.uint8))
        assert torch.equal(saved, train.images[i]) and int(train.labels[i]) == c


def test_select_init_starts_from_the_selected_patches(tmp_path: Path) -> None:
    """init=select (EDC's released start): recovery begins at RDED's picks, so with a learning rate too small to move a
    pixel the saved images are the images method=select keeps, class statistics on (the scoring passes bypass the
    BN-matching hooks)."""
    common = ["recover.select.factor=1", "evaluate.baselines=false", "relabel.epochs=1"]
    picked = _cfg("rded", tmp_path / "select", *common)
    run_pipeline(picked)
    cfg = _cfg("edc", tmp_path / "init", "recover.init=select", "recover.lr=1.0e-9", "recover.iterations=2", *common)
    run_pipeline(cfg)
    pngs = sorted((tmp_path / "select" / "synthetic").rglob("*.png"))
    assert pngs and all(p.read_bytes() == (tmp_path / "init" / p.relative_to(tmp_path / "select")).read_bytes() for p in pngs)
    assert (tmp_path / "init" / "class_stats.pt").is_file()


def test_cluster_init_starts_from_distinct_real_images_of_each_class(tmp_path: Path) -> None:
    from torchvision.io import decode_png

    from sre2l_ray.data.datasets import load_split

    cfg = _cfg("edc", tmp_path, "recover.init=cluster", "recover.lr=1.0e-9", "recover.iterations=2", "recover.select.candidates=20",
               "evaluate.baselines=false", "relabel.epochs=1")
    run_pipeline(cfg)
    train = load_split(cfg.data, train=True)
    store = synthetic_store(cfg, train.classes)
    for c in range(10):
        own = train.images[train.labels == c].flatten(1)
        found = [int((own == decode_png(torch.frombuffer(bytearray(store.image_path(c, k).read_bytes()), dtype=torch.uint8)).flatten()).all(1).nonzero()[0])
                 for k in range(cfg.recover.ipc)]
        assert len(set(found)) == cfg.recover.ipc  # each a real image of its class, none twice


def test_a_worker_is_sent_each_class_candidates_once_and_makes_the_same_images(tmp_path: Path) -> None:
    """With ipc_per_batch < ipc every recovery batch holds every class; the worker keeps its picks, so only its first
    batch brings candidates, and the images equal those of a worker sent them with every batch."""
    from sre2l_ray.data.synthetic import SyntheticStore
    from sre2l_ray.pipeline import teacher_meta
    from sre2l_ray.recovery import RealImages, batch_inputs, class_stats_path, recover_local, recovery_plan

    cfg = _cfg("edc", tmp_path / "run", "recover.init=cluster", "recover.iterations=2", "recover.select.candidates=20",
               "evaluate.baselines=false", "relabel.epochs=1")
    run_pipeline(cfg)  # the teacher, its class statistics and the condensed set, made the new way
    meta = {**teacher_meta(cfg), "class_stats": str(class_stats_path(tmp_path / "run"))}
    real, plan = RealImages(cfg), recovery_plan(10, cfg)
    assert len(plan) == 2 and all(s.classes == tuple(range(10)) for s in plan)
    made = synthetic_store(cfg, list(meta["classes"]))

    def recover(name: str, held_aware: bool) -> list[list[int]]:
        store, sent = SyntheticStore(tmp_path / name, list(meta["classes"]), cfg.recover.ipc, name, cfg.seed), []

        def inputs(shard, held):
            got = batch_inputs(cfg, real, shard, held if held_aware else frozenset())
            sent.append(sorted(got["candidates"]))
            return got

        recover_local(cfg, store, meta, plan, lambda shard, log: None, inputs)
        for c in range(10):
            for k in range(cfg.recover.ipc):
                assert store.image_path(c, k).read_bytes() == made.image_path(c, k).read_bytes(), (name, c, k)
        return sent

    assert recover("once", held_aware=True) == [list(range(10)), []]
    assert recover("every", held_aware=False) == [list(range(10))] * 2


@pytest.mark.ray
def test_one_ray_actor_is_sent_each_class_candidates_once(tmp_path: Path, ray_local) -> None:
    """Both recovery batches hold every class and go to the one actor: the second comes without candidates (the actor
    uses the picks it kept; a driver that held back candidates an actor lacks would fail it) and the images equal
    the in-process ones."""
    import shutil

    from sre2l_ray.pipeline import run_recover, run_squeeze

    extra = ("recover.init=cluster", "recover.iterations=2", "recover.select.candidates=20", "threads=1")
    local = _cfg("edc", tmp_path / "local", *extra)
    run_squeeze(local)
    run_recover(local)
    shutil.copytree(tmp_path / "local", tmp_path / "ray", ignore=shutil.ignore_patterns("synthetic"))  # the same teacher
    run_recover(_cfg("edc", tmp_path / "ray", *extra, "ray.enabled=true", "ray.num_actors=1", "ray.cpus_per_actor=0.5"))
    pngs = sorted((tmp_path / "local" / "synthetic").rglob("*.png"))
    assert len(pngs) == 20
    for png in pngs:
        assert png.read_bytes() == (tmp_path / "ray" / png.relative_to(tmp_path / "local")).read_bytes(), png.name


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["edc", "rded"])
def test_recipe_on_ray_gives_the_in_process_images(recipe: str, tmp_path: Path, ray_local) -> None:
    """Real images travel with each recovery batch to the actors; class statistics by file; EMA students on Ray
    Train: the same PNGs as in-process, students trained and evaluated."""
    early = ["squeeze.keep_epochs=[1]", "relabel.teacher_epoch=1"]  # an early-stopped labelling teacher, kept by Ray Train too
    local = _cfg(recipe, tmp_path / "local", "evaluate.baselines=false", "threads=1", *early)  # threads as each actor: float sums follow the thread count
    run_pipeline(local)
    on_ray = _cfg(recipe, tmp_path / "ray", "evaluate.baselines=false", "threads=1", "ray.enabled=true", *early, "ray.num_actors=2", "ray.cpus_per_actor=0.5")
    results = run_pipeline(on_ray)
    for png in sorted((tmp_path / "local" / "synthetic").rglob("*.png")):
        assert png.read_bytes() == (tmp_path / "ray" / png.relative_to(tmp_path / "local")).read_bytes(), png.name
    assert (tmp_path / "ray" / "ray").is_dir() and results["students"]["condensed"]["runs"][0]["top1"] >= 0
    if local.relabel.ema_decay is not None:  # the EMA, not the last weights, came back from Ray Train
        state = torch.load(tmp_path / "ray" / "students" / "condensed" / "seed0" / "model.pt", weights_only=True)["model"]
        last = torch.load(next((tmp_path / "ray" / "ray").glob("relabel-*/checkpoint_*/state.pt")), weights_only=True)
        assert any(not torch.equal(state[k], last["model"][k]) for k in state) and all(torch.equal(state[k], last["ema"][k]) for k in state)
    kept = [torch.load(tmp_path / side / "squeeze" / "teacher-e1.pt", weights_only=True)["model"] for side in ("local", "ray")]
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])  # Ray Train kept the same epoch-1 teacher
    meta = json.loads((tmp_path / "ray" / "synthetic" / "manifest.json").read_text())
    assert len(meta["shards_done"]) == len(json.loads((tmp_path / "local" / "synthetic" / "manifest.json").read_text())["shards_done"])


def test_soft_labels_from_an_early_teacher(tmp_path: Path) -> None:
    """relabel.teacher_epoch: squeeze keeps the weights after that epoch, and the soft-label teacher has exactly them,
    while recovery keeps the final teacher."""
    from sre2l_ray.config import ConfigError
    from sre2l_ray.teacher import kept_teacher_path, load_teacher

    with pytest.raises(ConfigError, match="teacher_epoch 1 is not kept; add it to squeeze.keep_epochs"):
        _cfg("sre2l", tmp_path, "relabel.teacher_epoch=1")
    cfg = _cfg("sre2l", tmp_path, "squeeze.keep_epochs=[1]", "relabel.teacher_epoch=1", "evaluate.baselines=false")
    run_pipeline(cfg)
    kept = torch.load(kept_teacher_path(tmp_path, 1), weights_only=True)["model"]
    labeller = load_teacher(cfg, torch.device("cpu"), labels=True).state_dict()
    final = load_teacher(cfg, torch.device("cpu")).state_dict()
    assert all(torch.equal(labeller[k], kept[k]) for k in kept)
    assert any(not torch.equal(final[k], kept[k]) for k in kept if kept[k].is_floating_point())
