"""Precomputed soft labels: the teacher labels every (epoch, image) view once, the student replays them.

A view is a pure function of (seed, epoch, index) (data/augment.py), CutMix partner included, so it is rebuilt at
training time instead of stored: only the teacher's top-k logits (fp16) and indices per view are kept, plus the
fp32 log-partition log(sum exp(z / T)) so the top-k probabilities are exact; the mass left over is spread evenly
over the other classes. One parquet file per epoch (written atomically): a rerun generates only missing epochs.

    <dir>/<key>/meta.json            what the labels depend on (views, teacher, temperature, k)
    <dir>/<key>/epoch-00003.parquet  index int32, values fixed_size_list<float16>[k], classes list<uint16|int32>[k], lse float32
                                     (topk=None: all logits in class order, no classes column)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.config import AugmentConfig, Config
from sre2l_ray.data.augment import ViewPlan, plan_views, render_views
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.io import atomic_write_json
from sre2l_ray.stages.relabel import student_seed
from sre2l_ray.stages.training import LossFn


@dataclass(frozen=True)
class LabelSpec:
    """Everything the stored labels depend on; `key` names their folder, so changed settings never mix."""

    seed: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    cutmix: float
    size: int
    n_items: int
    num_classes: int
    temperature: float
    topk: int | None
    source: str
    """Identifies teacher + images (e.g. a config hash); part of the key."""

    @property
    def k(self) -> int:
        return self.num_classes if self.topk is None else min(self.topk, self.num_classes)

    @property
    def aug(self) -> AugmentConfig:
        return AugmentConfig(crop_scale=self.crop_scale, crop_ratio=self.crop_ratio, flip=self.flip)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def plan(self, epoch: int, index: torch.Tensor) -> ViewPlan:
        return plan_views(self.seed, epoch, index, self.aug, self.size, self.n_items, self.cutmix)


def spec_from_config(cfg: Config, data: ImageSet, source: str) -> LabelSpec:
    """The spec matching how relabel's train_epoch renders views of `data` under `cfg`."""
    rl = cfg.relabel
    return LabelSpec(
        student_seed(cfg), tuple(rl.augment.crop_scale), tuple(rl.augment.crop_ratio), rl.augment.flip, rl.cutmix, data.size,
        len(data), data.num_classes, rl.temperature, rl.topk, source,
    )


def render_label_views(data: ImageSet, spec: LabelSpec, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """The views train_epoch shows the student for these indices in this epoch (same calls, same pixels)."""
    index = index.to(data.images.device)
    return render_views(data.images, data.normalize, index, spec.plan(epoch, index), data.size)


@torch.no_grad()
def label_epoch(
    teacher: nn.Module, data: ImageSet, spec: LabelSpec, epoch: int, batch_size: int = 256, channels_last: bool = True
) -> dict[str, torch.Tensor]:
    """Teacher top-k (fp16 logits, class ids) and fp32 log-partition at temperature T for every view of an epoch."""
    teacher.eval()
    values, classes, lse = [], [], []
    for index in torch.arange(spec.n_items).split(batch_size):
        views = render_label_views(data, spec, epoch, index)
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        logits = teacher(views).float()
        if spec.k == spec.num_classes:  # full outputs: class order, so no class ids need storing
            values.append(logits.half().cpu())
            classes.append(torch.arange(spec.num_classes).expand(len(index), -1))
        else:
            top = logits.topk(spec.k, dim=1)
            values.append(top.values.half().cpu())
            classes.append(top.indices.cpu())
        lse.append(torch.logsumexp(logits / spec.temperature, dim=1).cpu())
    return {"values": torch.cat(values), "classes": torch.cat(classes), "lse": torch.cat(lse)}


class SoftLabelStore:
    """Per-epoch parquet files of one LabelSpec under root/<spec.key>/."""

    def __init__(self, root: str | Path, spec: LabelSpec):
        self.spec = spec
        self.dir = Path(root) / spec.key

    def open(self) -> SoftLabelStore:
        atomic_write_json(self.dir / "meta.json", {"format": "sre2l-soft-labels/1", **asdict(self.spec)})
        return self

    def path(self, epoch: int) -> Path:
        return self.dir / f"epoch-{epoch:05d}.parquet"

    def done_epochs(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.dir.glob("epoch-*.parquet")}

    def write_epoch(self, epoch: int, labels: dict[str, torch.Tensor]) -> Path:
        k = self.spec.k
        cls_type = pa.uint16() if self.spec.num_classes <= 65535 else pa.int32()
        cls_np = labels["classes"].numpy().astype("uint16" if self.spec.num_classes <= 65535 else "int32")
        columns = {
            "index": pa.array(range(self.spec.n_items), pa.int32()),
            "values": pa.FixedSizeListArray.from_arrays(pa.array(labels["values"].numpy().reshape(-1)), k),
            "classes": pa.FixedSizeListArray.from_arrays(pa.array(cls_np.reshape(-1), cls_type), k),
            "lse": pa.array(labels["lse"].numpy()),
        }
        if k == self.spec.num_classes:
            del columns["classes"]  # full outputs are stored in class order
        table = pa.table(columns)
        out = self.path(epoch)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return out

    def read_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        path = self.path(epoch)
        try:
            t = pq.read_table(path)
        except (OSError, pa.ArrowException) as err:
            raise FileNotFoundError(
                f"soft labels for epoch {epoch} missing or unreadable at '{path}' ({str(err).splitlines()[0][:60]}); "
                "delete it and rerun relabel to regenerate"
            ) from None
        k = self.spec.k
        order = torch.tensor(t.column("index").to_numpy(), dtype=torch.long)
        values = torch.tensor(t.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, k))
        if "classes" in t.column_names:
            classes = torch.from_numpy(t.column("classes").combine_chunks().flatten().to_numpy().astype("int64").reshape(-1, k))
        else:
            classes = torch.arange(k).repeat(len(values), 1)
        lse = torch.tensor(t.column("lse").to_numpy(), dtype=torch.float32)
        # Dense by dataset index, whatever order the rows were written in.
        out = {"values": torch.empty_like(values), "classes": torch.empty_like(classes), "lse": torch.empty_like(lse)}
        out["values"][order], out["classes"][order], out["lse"][order] = values, classes, lse
        return out

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("epoch-*.parquet"))


def generate_soft_labels(
    teacher: nn.Module, data: ImageSet, store: SoftLabelStore, epochs: Iterable[int], batch_size: int = 256,
    channels_last: bool = True, on_epoch: Callable[[int], None] | None = None,
) -> list[int]:
    """Label the epochs that have no file yet, in this process; returns the epochs it wrote."""
    store.open()
    todo = sorted(set(epochs) - store.done_epochs())
    for epoch in todo:
        store.write_epoch(epoch, label_epoch(teacher, data, store.spec, epoch, batch_size, channels_last))
        if on_epoch is not None:
            on_epoch(epoch)
    return todo


def soft_targets(values: torch.Tensor, classes: torch.Tensor, lse: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Teacher probabilities at temperature T: exact on the stored top-k, the rest spread evenly over other classes."""
    top = torch.exp(values.float() / temperature - lse.unsqueeze(1))
    k = values.shape[1]
    if k == num_classes:
        return torch.zeros(values.shape[0], num_classes, device=values.device).scatter_(1, classes, top / top.sum(1, keepdim=True))
    top_mass = top.sum(1, keepdim=True).clamp(max=1.0)
    rest = (1.0 - top_mass) / (num_classes - k)
    target = rest.expand(-1, num_classes).clone()
    return target.scatter_(1, classes, top * (top_mass / top.sum(1, keepdim=True).clamp(min=1e-12)))


class PrecomputedSoftLoss:
    """LossFn replaying stored labels. The epoch of a batch is recognised from its view plan, which also proves the
    student sees exactly the views that were labelled (a mismatch is an error, never silently wrong targets)."""

    def __init__(self, store: SoftLabelStore, device: torch.device | str):
        self.store, self.spec, self.device = store, store.spec, torch.device(device)
        self.epoch: int | None = None
        self.labels: dict[str, torch.Tensor] = {}

    def _matches(self, epoch: int, index: torch.Tensor, plan: ViewPlan) -> bool:
        want = self.spec.plan(epoch, index)
        return bool(torch.equal(want.boxes, plan.boxes) and torch.equal(want.flip, plan.flip) and torch.equal(want.mix_on, plan.mix_on)
                    and torch.equal(want.mix_partner[want.mix_on], plan.mix_partner[plan.mix_on]))

    def _find_epoch(self, index: torch.Tensor, plan: ViewPlan) -> int:
        # Almost always the current epoch or the next one; a full scan only after a resume or a mismatch.
        likely = [] if self.epoch is None else [self.epoch, self.epoch + 1]
        for epoch in likely + sorted(self.store.done_epochs() - set(likely)):
            if self._matches(epoch, index, plan):
                return epoch
        raise ValueError(
            f"these views match no stored soft-label epoch in '{self.store.dir}' (other seed/augment/cutmix or more epochs "
            "than were labelled); regenerate the labels with the training settings"
        )

    def __call__(self, logits: torch.Tensor, views: torch.Tensor, index: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        epoch = self._find_epoch(index, plan)
        if epoch != self.epoch:
            self.labels = {k: v.to(self.device) for k, v in self.store.read_epoch(epoch).items()}
            self.epoch = epoch
        idx = index.to(self.device)
        target = soft_targets(self.labels["values"][idx], self.labels["classes"][idx], self.labels["lse"][idx], self.spec.temperature, self.spec.num_classes)
        log_p = F.log_softmax(logits.float() / self.spec.temperature, dim=1)
        # KL(target || student) with the same batchmean reduction as the online kd_loss.
        return F.kl_div(log_p, target.to(logits.device), reduction="batchmean")


def precomputed_student_loss(
    cfg: Config, data: ImageSet, teacher: nn.Module, label_dir: Path, source: str,
    on_epoch: Callable[[int], None] | None = None, epochs: Iterable[int] | None = None,
) -> LossFn:
    """Generate any missing epochs of labels for `data` (already on its training device), then a replaying LossFn.
    `epochs`: only these of the relabel epochs (a DDP rank's share; the others' files must exist before training)."""
    store = SoftLabelStore(label_dir, spec_from_config(cfg, data, source))
    todo = range(cfg.relabel.epochs) if epochs is None else epochs
    generate_soft_labels(teacher, data, store, todo, cfg.evaluate.batch_size, cfg.channels_last, on_epoch)
    return PrecomputedSoftLoss(store, data.images.device)


def storage_report(store: SoftLabelStore, epochs: int) -> dict[str, Any]:
    """Bytes on disk against full fp16 outputs for the same views (num_classes * 2 bytes per view)."""
    full = epochs * store.spec.n_items * store.spec.num_classes * 2
    used = store.bytes()
    return {"bytes": used, "full_fp16_bytes": full, "ratio": used / full if full else float("nan")}


def soft_label_source(cfg: Config, name: str) -> str:
    """What a student's precomputed soft labels are keyed by: the teacher and images (config hash) and the student
    (`name`: its kind and evaluation seed, whose images may differ, e.g. a redrawn random subset)."""
    return cfg.hash("seed", "data", "squeeze", "recover") + name + f"-te{cfg.relabel.teacher_epoch or cfg.squeeze.epochs}"
