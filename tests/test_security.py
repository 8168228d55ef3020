"""Security measures that a later edit could quietly undo: weights-only loading, safe YAML, no eval/pickle, sanitised
paths, services on 127.0.0.1, secrets kept out of MLflow params."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sre2l_ray import cli
from sre2l_ray.checkpoint import load_checkpoint
from sre2l_ray.config import ConfigError, build_config, load_config
from sre2l_ray.data.synthetic import SyntheticStore
from sre2l_ray.models import create_model
from sre2l_ray.tracking import safe_params

from conftest import ROOT

SOURCES = sorted([*(ROOT / "sre2l_ray").rglob("*.py"), *(ROOT / "jobs").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def _calls(pattern: str) -> list[tuple[Path, int, str]]:
    hits = []
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                hits.append((path.relative_to(ROOT), n, line.strip()))
    return hits


def test_every_torch_load_is_weights_only() -> None:
    loads = _calls(r"torch\.load\(")
    assert loads, "the scan finds the package's torch.load calls"
    assert [h for h in loads if "weights_only=True" not in h[2]] == []


def test_no_pickle_eval_exec_or_unsafe_yaml() -> None:
    assert _calls(r"\bimport pickle\b|\bpickle\.loads?\(|\bdill\b|\bcloudpickle\.loads?\(") == []
    assert _calls(r"yaml\.(load|unsafe_load|full_load)\(") == [], "yaml.safe_load only"
    # exec("") alone is allowed: a constant empty string runs no code (cli.interrupted evaluates one to clear the
    # interrupt CPython remembers from an exec() of a string; see the comment there).
    assert _calls(r"(?<![.\w])(eval|exec)\((?!\"\"\))") == [], "no eval()/exec() (model.eval() is fine)"
    assert _calls(r"shell=True") == []


class _Payload:
    """Unpickling this would create `path`; weights-only loading must refuse it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mknod, (self.path,))


def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="unreadable or truncated, or holds more than tensors"):
        load_checkpoint(evil)
    with pytest.raises(ValueError, match="not a plain state dict loadable with weights_only=True"):
        create_model("convnet", 10, 1, 28, depth=2, width=8, weights=str(evil))
    # The same file as squeeze.checkpoint through the CLI: one line, nothing executed.
    rc = cli.main(["squeeze", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'out'}", f"data.root={ROOT / 'data'}",
                   "ray.enabled=false", "tracking.enabled=false", f"squeeze.checkpoint={evil}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sre2l:")]
    assert rc == 2 and len(err) == 1 and "weights_only=True" in err[0]
    assert not marker.exists(), "the payload never ran"


def test_yaml_tags_are_refused_in_files_and_overrides(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"seed: !!python/object/apply:os.mknod ['{marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not a plain YAML value"):
        build_config({}, [f"seed=!!python/object/apply:os.mknod ['{marker}']"])
    assert not marker.exists()


def test_class_names_never_leave_the_output_folder(tmp_path: Path) -> None:
    names = ["../../escape", "a/b", "..", "/etc", "c\\..\\d", ".hidden", "ok"]
    store = SyntheticStore(tmp_path / "out", names, ipc=1, config_hash="h", seed=0)
    store.open()
    store.write_shard("s0", list(range(len(names))), [0] * len(names), torch.zeros(len(names), 1, 4, 4, dtype=torch.uint8))
    root = (tmp_path / "out" / "synthetic").resolve()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(root) for p in written), written
    assert len({store.image_path(c, 0).parent for c in range(len(names))}) == len(names), "one folder per class"
    x, y = store.load()
    assert x.shape[0] == len(names) and y.tolist() == list(range(len(names)))


def test_secrets_never_reach_mlflow_params() -> None:
    cfg = build_config({"tune": {"space": {"api_token": {"choice": ["tok-123"]}, "db_password": {"choice": ["pw"]}}}},
                       ["tracking.uri=https://alice:hunter2@mlflow.example:5000"])
    params = safe_params(cfg)
    assert params["tracking.uri"] == "https://alice:***@mlflow.example:5000"
    masked = {k: v for k, v in params.items() if "token" in k or "password" in k}
    assert masked and set(masked.values()) == {"***"}
    assert not any(s in v for v in params.values() for s in ("hunter2", "tok-123"))


def test_default_services_listen_on_localhost() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml")
    assert cfg.tracking.uri.startswith("sqlite:///"), "default tracking is a local file, no server"
    assert cfg.ray.address is None
    # The hint that tells users how to start an MLflow server binds it to 127.0.0.1.
    assert "--host 127.0.0.1" in (ROOT / "sre2l_ray/tracking.py").read_text()


@pytest.mark.ray
def test_local_ray_dashboard_binds_127_0_0_1() -> None:
    """A local Ray started by the package serves its dashboard and job API on 127.0.0.1 only."""
    import psutil
    import ray

    from sre2l_ray.distributed.cluster import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    env_address = os.environ.pop("RAY_ADDRESS", None)
    try:
        ensure_ray(load_config(ROOT / "configs/tiny.yaml", ["ray.address=local"]))
        url = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") else None
        url = url or ray._private.worker.global_worker.node.address_info["webui_url"]
        host, port = url.rsplit(":", 1)
        assert host == "127.0.0.1", url
        listeners = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)]
        assert listeners and all(c.laddr.ip == "127.0.0.1" for c in listeners), listeners
    finally:
        ray.shutdown()
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address


def test_outputs_honour_the_umask(tmp_path: Path) -> None:
    """Outputs were mode 0600 whatever the umask (mkstemp's mode survived the rename): a team sharing a cluster file
    system could not read results.json, teacher.pt or the PNGs. With umask 022 every output file is now 0644."""
    out = tmp_path / "out"
    args = [f"data.root={ROOT / 'data'}", f"output_dir={out}", "tracking.enabled=false", "ray.enabled=false", "relabel.epochs=1",
            "squeeze.epochs=1"]
    proc = subprocess.run([sys.executable, "-m", "sre2l_ray.cli", "pipeline", str(ROOT / "configs/tiny.yaml"), *args],
                          capture_output=True, text=True, timeout=600, umask=0o022)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"results.json", "synthetic_grid.png", "teacher.pt", "config.yaml", "manifest.json"} <= names
    assert any(p.suffix == ".png" and p.parent.parent.name == "synthetic" for p in files)
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {k: v for k, v in modes.items() if v != "0o644"} == {}
