"""One typed config tree for every stage, loaded from YAML with dotted ``key=value`` overrides.

Validation is pydantic v2 with ``extra="forbid"``: an unknown key names the closest valid one, a wrong type names
the expected type, so a typo in a long cluster job fails in the first second instead of after the teacher trained.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the fix."""


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number, not true/false")
    return v


# Counts and seeds are StrictInt: pydantic's lax mode would take `recover.ipc=true` as 1 and `10.0` as 10. YAML and
# JSON ints still pass. Floats stay lax (PyYAML reads `1e-3`, without a dot, as a string) but refuse booleans, and
# `allow_inf_nan=False` below refuses inf and nan (`relabel.temperature=inf` made every soft label uniform).
Real = Annotated[float, BeforeValidator(_no_bool)]

PIL_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
"""Pillow's default MAX_IMAGE_PIXELS (~89.5 M): the default image-size limit before decoding."""


# pyarrow file systems a URI output_dir / ray.storage_path may name (pyarrow.fs.FileSystem.from_uri), and the ones
# whose URIs must name a bucket or container.
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
_BUCKETED = ("s3", "gs", "gcs", "abfs", "abfss")


def is_uri(text: str) -> bool:
    """Whether a location is a URI (scheme://...) rather than a local path."""
    return "://" in text


def _location(v: str) -> str:
    """A local path, or a URI of a file system pyarrow opens; the URI's syntax is checked here (no network), its
    options and reachability when a command opens it (sre2l_ray/storage.py)."""
    if not is_uri(v):
        return v
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(v)
    except ValueError as err:
        raise ValueError(f"not a valid URI ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in URI_SCHEMES:
        raise ValueError(f"'{scheme}://' is not a file system pyarrow opens; use a local path or one of "
                         + ", ".join(f"{s}://" for s in URI_SCHEMES))
    if scheme in _BUCKETED and not parts.netloc:
        raise ValueError(f"the URI needs a bucket, e.g. {scheme}://my-bucket/runs/x")
    if scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
        raise ValueError("a file:// URI needs an absolute path, e.g. file:///data/runs/x")
    if scheme in _BUCKETED and parts.path.strip("/") == "":
        raise ValueError(f"name a folder inside the bucket, e.g. {scheme}://{parts.netloc}/runs/x (a run never owns a whole bucket)")
    return v


Location = Annotated[str, AfterValidator(_location)]
"""A local folder or a pyarrow file-system URI (s3://bucket/path?endpoint_override=host:port&scheme=http, gs://...)."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Group):
    name: Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "shards"] = "fashion_mnist"
    """Dataset kind; `imagefolder` covers Tiny-ImageNet and ImageNet laid out as train/ and val/ class folders."""
    root: str = "data"
    """Folder holding the dataset (torchvision layout, or the ImageFolder root)."""
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: StrictInt | None = Field(None, ge=1)
    """Side in pixels fed to the models; None takes the dataset's native size (28 for Fashion-MNIST)."""
    max_image_pixels: StrictInt = Field(PIL_MAX_IMAGE_PIXELS, ge=1)
    """Largest width x height an encoded image may claim in its header; larger ones are refused as corrupt before
    decoding (a 274-byte PNG can claim 50000 x 50000 and crash the decoder). Pillow's default."""
    download: bool = True
    """Let torchvision download when the files are missing (needs internet)."""
    num_workers: StrictInt = Field(0, ge=0)
    """Threads that decode an encoded split (imagefolder, shards) into memory; 0 decodes in the calling thread.
    torchvision's tensor datasets (already pixels) ignore it."""
    val_limit: StrictInt | None = Field(None, ge=1)
    """Evaluate on only the first N validation images (quick checks); None = the whole split."""
    train_limit: StrictInt | None = Field(None, ge=1)
    """Train the teacher on a seeded stratified subset of N images (tests); None = the whole split."""


class ModelConfig(_Group):
    name: str = "convnet"
    """Registry name: convnet, resnet18, resnet50 (small stem for <= 64 px), tv_resnet18, tv_resnet50, tiny_bn."""
    depth: StrictInt = Field(3, ge=1, le=6)
    """ConvNet conv/pool blocks."""
    width: StrictInt = Field(128, ge=1)
    """ConvNet channels."""
    weights: str | None = None
    """torchvision weights name (e.g. IMAGENET1K_V1) or a local state-dict file loaded with weights_only=True."""


def _crop_scale(v: tuple[float, float]) -> tuple[float, float]:
    if not (0 < v[0] <= v[1] <= 1):
        raise ValueError("crop_scale must satisfy 0 < lower <= upper <= 1; e.g. [0.08, 1.0]")
    return v


def _crop_ratio(v: tuple[float, float]) -> tuple[float, float]:
    if not (0 < v[0] <= v[1]):
        raise ValueError("crop_ratio must satisfy 0 < lower <= upper; e.g. [0.75, 1.33]")
    return v


CropScale = Annotated[tuple[Real, Real], AfterValidator(_crop_scale)]
"""RandomResizedCrop area fraction (lower, upper), each in (0, 1]."""
CropRatio = Annotated[tuple[Real, Real], AfterValidator(_crop_ratio)]
"""RandomResizedCrop aspect ratio range (lower, upper), both > 0."""


class AugmentConfig(_Group):
    crop_scale: CropScale = (0.08, 1.0)
    """RandomResizedCrop area fraction (lower, upper), each in (0, 1]."""
    crop_ratio: CropRatio = (3 / 4, 4 / 3)
    flip: bool = True


class SqueezeConfig(_Group):
    model: ModelConfig = ModelConfig()
    epochs: StrictInt = Field(10, ge=1)
    batch_size: StrictInt = Field(256, ge=1)
    lr: Real = Field(0.1, gt=0)
    momentum: Real = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: Real = Field(5e-4, ge=0)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    label_smoothing: Real = Field(0.0, ge=0, lt=1)
    augment: AugmentConfig = AugmentConfig(crop_scale=(0.5, 1.0))
    checkpoint: str | None = None
    """Use this teacher state dict instead of training one (weights_only load)."""
    keep_epochs: list[StrictInt] = Field(default_factory=list)
    """Also keep the teacher's weights after these epochs (1 = after the first) as squeeze/teacher-e<N>.pt, for
    relabel.teacher_epoch."""


class SelectConfig(_Group):
    """RDED (arXiv 2312.03526) patch selection: defaults from its released scripts (factor 2, 300 candidates, 5 crops)."""

    factor: Literal[1, 2] = 2
    """Patches per image side: factor x factor selected crops, each downsampled by factor, tile one image."""
    candidates: StrictInt = Field(300, ge=1)
    """Real images per class considered (RDED's mipc); each contributes at most one patch."""
    crops: StrictInt = Field(5, ge=1)
    """Random crops scored per candidate (RDED's num_crop); the candidate keeps its lowest-CE one."""
    crop_scale: CropScale = (0.08, 1.0)
    """Candidate crops' area fraction (lower, upper) (RDED: torchvision's default, 0.08-1)."""
    crop_ratio: CropRatio = (1.0, 1.0)
    """Candidate crops' aspect ratio range (RDED: square patches)."""
    batch_size: StrictInt = Field(256, ge=1)
    """Crops scored per teacher forward (memory only; the selection does not depend on it)."""


class RecoverConfig(_Group):
    ipc: StrictInt = Field(10, ge=1)
    """Synthetic images per class."""
    iterations: StrictInt = Field(1000, ge=1)
    lr: Real = Field(0.25, gt=0)
    betas: tuple[Real, Real] = (0.5, 0.9)
    r_bn: Real = Field(0.01, ge=0)
    """Weight of the BN-statistics term against cross-entropy."""
    first_bn_multiplier: Real = Field(10.0, ge=0)
    jitter: StrictInt = Field(4, ge=0)
    """Max random shift (pixels, each axis, wrapping) per step."""
    augment: AugmentConfig = AugmentConfig()
    classes_per_batch: StrictInt | None = Field(None, ge=1)
    """Classes that share one BN-matching batch; None = all classes, as in the paper."""
    ipc_per_batch: StrictInt = Field(1, ge=1)
    """IPC indices per BN-matching batch; batch size = classes_per_batch * ipc_per_batch."""
    compile: bool = False
    """torch.compile the teacher for the recovery loop (opt-in)."""
    bf16: bool = False
    """bf16 autocast of the teacher forward on CUDA."""
    # Recipe knobs of SRe2L's successors (issue #14, recipes as data); the defaults are plain SRe2L.
    crop_schedule: Literal["none", "step", "linear", "cosine"] = "none"
    """CDA (arXiv 2311.18838) crop curriculum: the crop's lower scale bound anneals from the upper one to augment.crop_scale[0]."""
    crop_milestone: Real = Field(1.0, gt=0, le=1)
    """Fraction of the iterations at which the crop curriculum reaches augment.crop_scale[0] (CDA's scripts: 1.0)."""
    init: Literal["noise", "real", "select", "cluster"] = "noise"
    """Start images: Gaussian noise (SRe2L), a seeded real training image of the class (EDC, arXiv 2404.13733), the
    class's teacher-selected real patches (RDED's selection with recover.select, the start EDC's released code uses),
    or the real images nearest the centres of k-means (k = ipc) on the teacher's features of recover.select.candidates
    seeded candidates (covers the class)."""
    class_stats_weight: Real = Field(0.0, ge=0, le=1)
    """EDC soft category-aware matching alpha: weight of per-class BN statistics against the global ones (EDC: 0.5)."""
    method: Literal["optimise", "select"] = "optimise"
    """optimise images (SRe2L) or select real patches scored by the teacher, no optimisation (RDED)."""
    select: SelectConfig = SelectConfig()
    """RDED selection settings (method=select)."""

    @model_validator(mode="after")
    def _select_has_enough_candidates(self) -> RecoverConfig:
        need = self.ipc * self.select.factor**2
        if self.init == "cluster":
            need = self.ipc
        if (self.method == "select" or self.init in ("select", "cluster")) and self.select.candidates < need:
            raise ValueError(
                f"select.candidates ({self.select.candidates}) must be at least ipc * factor^2 ({need}): each patch comes "
                f"from its own candidate image; raise recover.select.candidates or lower recover.ipc / select.factor"
            )
        return self


class RelabelConfig(_Group):
    model: ModelConfig = ModelConfig()
    """Student architecture, independent of the teacher's."""
    epochs: StrictInt = Field(300, ge=1)
    batch_size: StrictInt = Field(64, ge=1)
    lr: Real = Field(1e-3, gt=0)
    weight_decay: Real = Field(0.01, ge=0)
    temperature: Real = Field(4.0, gt=0)
    augment: AugmentConfig = AugmentConfig()
    seed: StrictInt | None = None
    """Seed of the student's init and view order; None = the top-level seed. Setting it retrains only the students
    (teacher and recovered set are keyed by the top-level seed), e.g. to measure seed-to-seed spread."""
    cutmix: Real = Field(0.0, ge=0, le=1)
    """Probability of applying CutMix to a batch (0 disables)."""
    soft_labels: Literal["online", "precomputed"] = "online"
    topk: StrictInt | None = Field(10, ge=1)
    """Precomputed labels: keep the teacher's top-k logits (None = full outputs)."""
    compile: bool = False
    """torch.compile student and teacher (opt-in; the first epoch pays the compile)."""
    bf16: bool = False
    """bf16 autocast of the student and teacher forwards on CUDA."""
    teacher_epoch: StrictInt | None = Field(None, ge=1)
    """Soft labels from the teacher kept after this squeeze epoch (squeeze.keep_epochs) instead of the final one: an
    early-stopped teacher can label better at low IPC (Qin et al., arXiv 2406.10485). Recovery uses the final teacher."""
    # Student-side recipe knobs (EDC, arXiv 2404.13733); they apply alike to the condensed set and the real baselines.
    ema_decay: Real | None = Field(None, gt=0, lt=1)
    """Train-step decay of an exponential moving average of the student's weights, returned as the trained model;
    None = the last weights (EDC: 0.99-0.999)."""
    schedule_stretch: Real = Field(1.0, ge=1)
    """EDC's smoothed cosine: the cosine spans stretch x the training steps, so lr ends at 0.5*(1+cos(pi/stretch)) of its peak (EDC: 2)."""


class EvaluateConfig(_Group):
    batch_size: StrictInt = Field(500, ge=1)
    baselines: bool = True
    """Also train, per seed, students on a random real subset of the same IPC (soft and hard labels) and a hard-label
    student on the condensed set, for IOR and HLR (DD-Ranking)."""
    seeds: StrictInt = Field(1, ge=1)
    """Evaluation seeds: each trains every student anew (student seed relabel.seed + k) and draws a new random real
    subset (with the same seed); results report mean +- std. Benchmarks use >= 3. Another relabel.seed (default: the
    top-level seed) evaluates the same condensed set afresh: new students, new subsets."""
    lr_grid: list[Real] = Field(default_factory=list)
    """Optional student learning rates to search, separately for each student kind, on seed 0 (DD-Ranking searches
    {1e-3, 5e-3, 1e-2, 5e-2, 0.1}); the best (val top-1) is then used for every seed. Empty = relabel.lr."""

    @field_validator("lr_grid")
    @classmethod
    def _lrs_positive(cls, v: list[float]) -> list[float]:
        if any(not (0 < x < float("inf")) for x in v):
            raise ValueError(f"every lr in lr_grid must be a positive finite number, got {v}")
        return v


class TrackingConfig(_Group):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "sre2l"
    artifact_root: str | None = None
    """Folder (or URI) for the artifacts of experiments this creates; None = beside a sqlite store
    (<folder of the .db>/mlartifacts), the server's own for http(s) stores. An existing experiment keeps its own."""


class RayConfig(_Group):
    enabled: bool = True
    """Run stages through Ray (Train for training, actors for recovery); False runs the cores in-process."""
    address: str | None = None
    """Cluster address; None starts or joins a local Ray (`ray.init()`)."""
    num_workers: StrictInt = Field(1, ge=1)
    """Ray Train workers (DDP) for squeeze and relabel."""
    cpus_per_worker: Real = Field(0.5, gt=0)
    num_actors: StrictInt = Field(1, ge=1)
    """Recovery actors."""
    cpus_per_actor: Real = Field(1.0, gt=0)
    placement: Literal["pack", "spread"] = "pack"
    """How recovery actors and Train workers sit on nodes: pack (Ray's default: fill a node first, DDP talks within
    it) or spread (one per node where there are enough: every node's cores and memory used, a lost node takes fewer)."""
    use_gpu: bool | None = None
    """None = use GPUs when the cluster has them."""
    max_failures: StrictInt = Field(2, ge=0)
    checkpoint_every_s: Real = Field(10.0, ge=0)
    """Seconds of training between Ray Train reports (metrics + checkpoint; a resume redoes at most this much);
    0 = every epoch. Epochs longer than this are each reported."""
    poll_interval_s: Real = Field(0.5, gt=0)
    """How often the Ray Train controller polls its workers (Ray's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s,
    wins when set): the end of a run and every report wait for the next poll."""
    storage_path: Location | None = None
    """Ray Train storage: a local/NFS folder or a pyarrow URI (s3://, gs://, ...; see output_dir), where Ray Train
    keeps its checkpoints itself; None = <output_dir>/ray (the URI's ray/ folder when output_dir is a URI)."""


class TuneConfig(_Group):
    num_samples: StrictInt = Field(4, ge=1)
    """Trials (random/optuna); grid search over only `grid`/`choice` keys runs the full grid once."""
    search: Literal["grid", "random", "optuna"] = "random"
    space: dict[str, Any] = Field(default_factory=dict)
    """Dotted config key -> {"choice": [...]} | {"uniform": [lo, hi]} | {"grid": [...]}; empty = crop scale and
    temperature (see distributed/tune.py DEFAULT_SPACE)."""
    max_concurrent: StrictInt | None = Field(None, ge=1)
    """Trials at once; None = cluster CPUs // cpus_per_trial."""
    cpus_per_trial: Real = Field(1.0, gt=0)
    asha: bool = True
    """ASHA early stopping on relabel epochs (val top-1)."""
    eval_every: StrictInt = Field(0, ge=0)
    """Relabel epochs between a trial's val evaluations (each one an ASHA decision point and a resume point);
    0 = about 10 per trial. Scoring the full val set every epoch can cost more than the student's training."""


class StorageConfig(_Group):
    """How a URI output_dir is worked on (sre2l_ray/storage.py); changes no output."""

    staging_dir: str | None = None
    """Local working copy of a URI output_dir: pulled from it first (resume), pushed back while the command runs and
    when it ends. None = <XDG cache, ~/.cache>/sre2l/staging/<bucket>/<path>-<hash>. Unused for a local output_dir."""
    sync_every_s: Real = Field(60.0, ge=0)
    """Seconds between pushes of new and changed files while a command runs (finished work reaches the URI even if
    the machine is lost); 0 = only when the command ends."""


class Config(_Group):
    seed: StrictInt = 0
    output_dir: Location = "runs/default"
    """Run folder: a local path, or a pyarrow file-system URI (s3://bucket/runs/x, with endpoint options as the URI's
    query, e.g. ?endpoint_override=127.0.0.1:9000&scheme=http) whose work happens in storage.staging_dir."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    threads: StrictInt | None = Field(None, ge=1)
    """torch intra-op threads; None = all free cores."""
    channels_last: bool = True
    data: DataConfig = DataConfig()
    squeeze: SqueezeConfig = SqueezeConfig()
    recover: RecoverConfig = RecoverConfig()
    relabel: RelabelConfig = RelabelConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    tune: TuneConfig = TuneConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _teacher_epoch_kept(self) -> Config:
        te, sq = self.relabel.teacher_epoch, self.squeeze
        if any(not 1 <= e <= sq.epochs for e in sq.keep_epochs):
            raise ValueError(f"squeeze.keep_epochs must lie in 1..squeeze.epochs ({sq.epochs}), got {sq.keep_epochs}")
        if te is not None and te not in sq.keep_epochs and te != sq.epochs:
            raise ValueError(f"relabel.teacher_epoch {te} is not kept; add it to squeeze.keep_epochs (now {sq.keep_epochs})")
        return self

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        # A field validator, not a model one: the error then quotes the device, not the whole config dict.
        if not (v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    def hashed(self, *sections: str) -> dict[str, Any]:
        """The named sections (all when none) as `hash` sees them: keys that do not change outputs left out."""
        dump = self.model_dump(mode="json")
        dump.pop("storage")  # where the work is staged changes no output (and came after outputs existed)
        for section, keys in _NOT_HASHED.items():
            for k in keys:
                dump[section].pop(k, None)
        for section, keys in _HASHED_UNLESS_DEFAULT.items():
            for k in keys:
                if dump[section].get(k) == type(self).model_fields[section].default.model_dump(mode="json")[k]:
                    dump[section].pop(k)
        return {k: dump[k] for k in sections} if sections else dump

    def hash(self, *sections: str) -> str:
        """Short stable hash of the named sections (all when none), used to tell whether outputs still match."""
        return hashlib.sha256(json.dumps(self.hashed(*sections), sort_keys=True).encode()).hexdigest()[:16]


# Keys that do not change any output (limits and bookkeeping) and came after outputs existed: left out of the hash so
# adding them does not make every finished teacher and synthetic set look stale.
_NOT_HASHED = {"data": ("max_image_pixels",), "tracking": ("artifact_root",)}
# Knobs added after outputs existed whose default reproduces the earlier outputs exactly: hashed only when set, so
# adding them leaves finished teachers and students valid.
_HASHED_UNLESS_DEFAULT = {"squeeze": ("keep_epochs",), "relabel": ("teacher_epoch",)}


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + name + "."))
    return keys


def _closest_key(loc: str) -> str | None:
    """The valid key a typo most likely meant: a sibling sharing its prefix, else the closest spelling."""
    keys = _valid_keys(Config)
    parent, _, leaf = loc.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    prefixed = [k for k in siblings if len(leaf) >= 3 and k.rpartition(".")[2].startswith(leaf[:4])]
    if prefixed:
        return prefixed[0]
    close = difflib.get_close_matches(loc, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(loc, keys, n=1, cutoff=0.5)
    return close[0] if close else None


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        close = _closest_key(loc)
        hint = f"; did you mean '{close}'?" if close else "; see `sre2l config show` for valid keys"
        return f"unknown config key '{loc}'{hint}"
    got = e.get("input")
    msg = e["msg"]
    if isinstance(msg, str) and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if isinstance(got, dict):  # a check across keys of a section (or of the whole config): its message names them
        return f"config: {msg}" if not loc else f"config section '{loc}': {msg}"
    shown = repr(got)
    if isinstance(got, list) and len(shown) > 80:
        shown = f"a {type(got).__name__} of {len(got)} items"  # never a whole section in a one-line message
    return f"config key '{loc}': {msg} (got {shown}){_TYPE_HINTS.get(e['type'], '')}"


_TYPE_HINTS = {
    "int_type": "; write a whole number, e.g. 10",
    "int_parsing": "; write a whole number, e.g. 10",
    "finite_number": "; write a finite number",
}


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``a.b=1`` strings into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value; write e.g. recover.ipc=10")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:  # e.g. a !!python/object tag, which safe_load refuses
            raise ConfigError(f"override '{item}' is not a plain YAML value ({str(err).splitlines()[0]}); quote or fix it") from None
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "space":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    merged = _merge(raw, parse_overrides(overrides or []))
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | list[str | Path] | None, overrides: list[str] | None = None) -> Config:
    """Read YAML recipes (safe_load), later files overriding earlier ones (e.g. a dataset config, then a recipe from
    configs/recipes/), apply overrides, validate."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    raw: dict[str, Any] = {}
    for p in paths:
        raw = _merge(raw, _read_yaml(Path(p)))
    return build_config(raw, overrides)


def _read_yaml(p: Path, depth: int = 0) -> dict[str, Any]:
    """Read a recipe; a top-level `base: other.yaml` (relative to this file) is loaded first and overridden."""
    if p.is_dir():
        raise ConfigError(f"config '{p}' is a directory; pass a YAML file, e.g. configs/tiny.yaml")
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found; pass one of configs/*.yaml")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{p}' is not valid YAML ({str(err).splitlines()[0]}); fix its syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections at top level")
    base = raw.pop("base", None)
    if base is not None:
        if depth > 8:
            raise ConfigError(f"config file '{p}': `base` chain too deep (a cycle?)")
        raw = _merge(_read_yaml(p.parent / str(base), depth + 1), raw)
    return raw


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params and comparison tables."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(cfg.model_dump(mode="json"), "")
    return out
