from pathlib import Path

import pytest

from sre2l_ray.config import Config, ConfigError, build_config, flatten, load_config, parse_overrides, to_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.joinpath("configs").rglob("*.yaml"))  # recipes/ too: a stale recipe fails here


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # A resolved config round-trips through YAML (what runs save beside their outputs).
    import yaml

    assert build_config(yaml.safe_load(to_yaml(cfg))) == cfg


def test_shipped_configs_cover_the_recipes() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"fashion_mnist", "fashion_mnist_ipc1", "fashion_mnist_ipc50", "cifar10", "cifar100", "tiny_imagenet", "imagenet1k", "demo", "tiny"} <= names
    imagenet = load_config(Path(CONFIGS[0]).parent / "imagenet1k.yaml")
    assert (imagenet.data.image_size, imagenet.recover.r_bn, imagenet.recover.lr, imagenet.recover.iterations) == (224, 0.01, 0.25, 1000)


def test_overrides_are_typed_and_nested() -> None:
    cfg = build_config({}, ["recover.ipc=3", "recover.augment.crop_scale=[0.2, 0.9]", "relabel.temperature=2.5", "data.val_limit=null"])
    assert cfg.recover.ipc == 3
    assert cfg.recover.augment.crop_scale == (0.2, 0.9)
    assert cfg.relabel.temperature == 2.5
    assert parse_overrides(["a.b.c=x"]) == {"a": {"b": {"c": "x"}}}


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'recover.ipcc'; did you mean 'recover.ipc'\?"):
        build_config({}, ["recover.ipcc=3"])
    with pytest.raises(ConfigError, match="did you mean 'relabel.temperature'"):
        build_config({"relabel": {"temprature": 3}})


def test_wrong_type_names_the_expected_type() -> None:
    with pytest.raises(ConfigError, match=r"'recover.ipc'.*valid integer.*'ten'"):
        build_config({}, ["recover.ipc=ten"])


@pytest.mark.parametrize(
    "override, field",
    [("recover.lr=0", "recover.lr"), ("relabel.temperature=-1", "relabel.temperature"), ("recover.augment.crop_scale=[0.5,1.5]", "crop_scale"), ("squeeze.lr=-0.1", "squeeze.lr")],
)
def test_out_of_range_values_are_refused(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build_config({}, [override])


def test_counts_are_strict_and_floats_finite() -> None:
    """YAML ints and `1e-3` (a string to PyYAML) still pass; booleans, whole floats for counts, inf and nan do not."""
    cfg = build_config({"recover": {"ipc": 3}}, ["relabel.lr=1e-3", "relabel.epochs=7", "ray.cpus_per_worker=1"])
    assert (cfg.recover.ipc, cfg.relabel.lr, cfg.relabel.epochs, cfg.ray.cpus_per_worker) == (3, 0.001, 7, 1.0)
    for bad in ("recover.ipc=true", "recover.ipc=10.0", "relabel.temperature=inf", "relabel.lr=.nan",
                "recover.augment.crop_scale=[0.5, .inf]", "relabel.cutmix=false", "data.image_size=0", "device=cuda:x"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[-1]):
            build_config({}, [bad])


def test_new_keys_leave_existing_output_hashes_alone() -> None:
    """data.max_image_pixels and tracking.artifact_root change no output: finished teachers and sets stay valid."""
    base = build_config({})
    other = build_config({}, ["data.max_image_pixels=1000", "tracking.artifact_root=/x"])
    assert base.hash("seed", "data", "squeeze") == other.hash("seed", "data", "squeeze") and base.hash() == other.hash()
    assert base.hash("data") == "7b5ca4623e33d576"  # the value before these keys existed


def test_bad_override_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not key=value"):
        build_config({}, ["recover.ipc"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("recover: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_base_chain_merges_and_hash_tracks_sections(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("recover: {ipc: 5, iterations: 7}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nrecover: {ipc: 6}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.recover.ipc, cfg.recover.iterations) == (6, 7)
    other = build_config({}, ["relabel.epochs=3"])
    assert cfg.hash("squeeze") == other.hash("squeeze")
    assert cfg.hash("recover") != other.hash("recover")
    assert flatten(cfg)["recover.ipc"] == 6


def test_later_yaml_files_override_earlier_ones(tmp_path: Path) -> None:
    """`sre2l pipeline configs/fashion_mnist.yaml configs/recipes/x.yaml k=v`: dataset config, then a recipe, then overrides."""
    from sre2l_ray.cli import parse_config_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recover: {iterations: 7}\nrelabel: {temperature: 9.0}\n")
    cfg = parse_config_args([str(ROOT / "configs/fashion_mnist.yaml"), str(recipe), "relabel.temperature=3"])
    assert cfg.recover.iterations == 7 and cfg.relabel.temperature == 3.0
    assert cfg.recover.ipc == 10 and cfg.recover.init == "real"  # the dataset config's other keys stay


def test_knobs_added_later_are_hashed_only_when_set() -> None:
    """squeeze.keep_epochs and relabel.teacher_epoch at their defaults keep the hashes finished outputs carry."""
    base = load_config(ROOT / "configs/fashion_mnist.yaml")
    dump = base.model_dump(mode="json")
    for section, key in (("squeeze", "keep_epochs"), ("relabel", "teacher_epoch")):
        import hashlib
        import json

        old = {k: v for k, v in dump[section].items() if k != key}  # the section as it was before the knob existed
        assert hashlib.sha256(json.dumps({section: old}, sort_keys=True).encode()).hexdigest()[:16] == base.hash(section)
    kept = load_config(ROOT / "configs/fashion_mnist.yaml", ["squeeze.keep_epochs=[2]", "relabel.teacher_epoch=2"])
    assert kept.hash("squeeze") != base.hash("squeeze") and kept.hash("relabel") != base.hash("relabel")


def test_a_config_yaml_from_before_a_key_existed_is_the_same_condensed_set(tmp_path: Path) -> None:
    """rundir.check_config reads an older config.yaml with today's defaults and compares what the hash compares: a
    folder finished before data.max_image_pixels or squeeze.keep_epochs existed is not 'another condensed set'."""
    import yaml

    from sre2l_ray.rundir import check_config, differing_keys

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}"])
    old = cfg.model_dump(mode="json")
    del old["data"]["max_image_pixels"], old["squeeze"]["keep_epochs"], old["relabel"]["teacher_epoch"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "teacher.pt").write_bytes(b"")  # the folder holds work
    assert differing_keys(old, cfg) == [] and check_config(cfg)
    other = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}", "squeeze.keep_epochs=[1]"])
    assert differing_keys(old, other) == ["squeeze.keep_epochs"]
