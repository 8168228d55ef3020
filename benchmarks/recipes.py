"""Recipes of the SRe2L family against a random real subset, the DD-Ranking way: every recipe x IPC on one dataset,
>= 3 evaluation seeds, the random subset redrawn per seed and trained with the identical student recipe and labels.

    .venv/bin/python benchmarks/recipes.py --dataset fashion_mnist --ipc 1 10 50 --recipes sre2l cda edc rded --seeds 3
    .venv/bin/python benchmarks/recipes.py --dataset gtsrb10 --ipc 1 10 data.root=/data/gtsrb10

The dataset's configs are configs/<dataset>.yaml and, per IPC when present, configs/<dataset>_ipc<N>.yaml; a recipe
is configs/recipes/<recipe>.yaml laid over them. Stages run in-process (ray.enabled=false) under
runs/bench_recipes/<dataset>/ and resume, so the benchmark can be spread over several sittings: rerun the same
command and finished teachers, condensed sets and students are reused. One teacher per dataset is trained once and
copied into every run folder (its config hash is checked there); random-subset students depend only on the teacher
and the student recipe, so they are copied between recipes that share a student recipe (their key is checked, a
mismatch retrains).

Writes benchmarks/results/recipes_<dataset>.json (one row per IPC x recipe, updated after each), prints the markdown
table of docs/BENCHMARKS.md, and copies each condensed set's grid to docs/figures/recipes/<dataset>_<recipe>_ipc<N>.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from sre2l_ray.config import Config, load_config
from sre2l_ray.pipeline import run_evaluate, run_recover, run_relabel, run_squeeze

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures" / "recipes"


def dataset_configs(dataset: str, ipc: int) -> list[Path]:
    per_ipc = ROOT / "configs" / f"{dataset}_ipc{ipc}.yaml"
    return [per_ipc if per_ipc.is_file() else ROOT / "configs" / f"{dataset}.yaml"]


def copy_missing(src: Path, dst: Path) -> None:
    """Copy a finished result (teacher, student folders) unless the destination has one; keys are checked on use."""
    if src.exists() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def run_one(cfg: Config, teacher_dir: Path, donors: list[Path]) -> dict[str, object]:
    out = Path(cfg.output_dir)
    copy_missing(teacher_dir / "teacher.pt", out / "teacher.pt")
    mine = cfg.model_dump(mode="json")["relabel"]
    for donor in donors:
        # Only a donor whose students trained with this student recipe (the keys are checked again on use).
        if yaml.safe_load((donor / "config.yaml").read_text()).get("relabel") != mine:
            continue
        for kind in ("random_soft", "random_hard"):
            for seed_dir in sorted((donor / "students" / kind).glob("seed*")):
                copy_missing(seed_dir, out / "students" / kind / seed_dir.name)
    run_recover(cfg)
    run_relabel(cfg)
    return run_evaluate(cfg)


def row_of(recipe: str, res: dict) -> dict[str, object]:
    s = res["students"]
    pick = lambda kind: (round(s[kind]["top1"], 2), round(s[kind]["top1_std"], 2))  # noqa: E731
    return {
        "ipc": res["ipc"], "recipe": recipe, "seeds": res["seeds"],
        "condensed": pick("condensed"), "random_soft": pick("random_soft"), "random_hard": pick("random_hard"),
        "condensed_hard": pick("condensed_hard"),
        "ior": (round(res["ior"]["top1"], 2), round(res["ior"]["top1_std"], 2)), "hlr": round(res["hlr"]["top1"], 2),
        "condense_s": round(res["stages"]["recover"]["wall_s"], 1),
        "per_seed": {k: [round(r["top1"], 2) for r in v["runs"]] for k, v in s.items()},
    }


def table(rows: list[dict]) -> str:
    pm = lambda v: f"{v[0]:.1f} ± {v[1]:.1f}"  # noqa: E731
    lines = ["| IPC | recipe | condensed + soft | random + soft | random, hard | IOR | HLR | condensation s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["ipc"], r["recipe"])):
        ior = f"{r['ior'][0]:+.1f} ± {r['ior'][1]:.1f}"
        lines.append(f"| {r['ipc']} | {r['recipe']} | {pm(r['condensed'])} | {pm(r['random_soft'])} | {pm(r['random_hard'])} | "
                     f"{ior} | {r['hlr']:.1f} | {r['condense_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--recipes", nargs="+", default=["sre2l", "cda", "edc", "rded"], help="names in configs/recipes/ or YAML paths")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=None, help="run folders (default runs/bench_recipes/<dataset>)")
    ap.add_argument("--result", default=None, help="default benchmarks/results/recipes_<dataset>.json")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON", help="only print the table of these result files")
    ap.add_argument("overrides", nargs="*", help="key=value for every run (e.g. data.root=...)")
    args = ap.parse_args()
    if args.table:  # several sittings (e.g. one result file per IPC) -> one table
        print(table([r for f in args.table for r in json.loads(Path(f).read_text())["rows"]]))
        return
    out = Path(args.out or ROOT / "runs" / "bench_recipes" / args.dataset)
    result = Path(args.result or ROOT / "benchmarks" / "results" / f"recipes_{args.dataset}.json")
    base = ["tracking.enabled=false", "ray.enabled=false", f"evaluate.seeds={args.seeds}", *args.overrides]
    report = json.loads(result.read_text()) if result.is_file() else {"rows": []}
    rows = {(r["ipc"], r["recipe"]): r for r in report["rows"]}

    teacher_cfg = load_config(dataset_configs(args.dataset, args.ipc[0]), base + [f"output_dir={out / 'teacher'}"])
    t0 = time.perf_counter()
    teacher = run_squeeze(teacher_cfg)
    report.update({"dataset": args.dataset, "teacher_top1": teacher.get("val_top1"), "squeeze_s": round(time.perf_counter() - t0, 1)})
    for ipc in args.ipc:
        done: list[Path] = []
        for recipe in args.recipes:
            named = ROOT / "configs" / "recipes" / f"{recipe}.yaml"
            paths = dataset_configs(args.dataset, ipc) + [named if named.is_file() else Path(recipe)]
            recipe = Path(recipe).stem
            cfg = load_config(paths, base + [f"output_dir={out / f'ipc{ipc}' / recipe}", f"recover.ipc={ipc}"])
            res = run_one(cfg, Path(teacher_cfg.output_dir), done)
            done.append(Path(cfg.output_dir))
            rows[(ipc, recipe)] = row_of(recipe, res)
            print(json.dumps(rows[(ipc, recipe)]), flush=True)
            FIGURES.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(cfg.output_dir) / "synthetic_grid.png", FIGURES / f"{args.dataset}_{recipe}_ipc{ipc}.png")
            report["rows"] = sorted(rows.values(), key=lambda r: (r["ipc"], r["recipe"]))
            report["command"] = "benchmarks/recipes.py " + " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                                                     for k, v in (("dataset", args.dataset), ("ipc", args.ipc), ("recipes", args.recipes), ("seeds", args.seeds)))
            result.parent.mkdir(parents=True, exist_ok=True)
            tmp = result.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(result)
    print(f"\n{args.dataset}: teacher top-1 {report['teacher_top1']:.2f}%\n")
    print(table(report["rows"]))


if __name__ == "__main__":
    main()
