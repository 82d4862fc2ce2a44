"""The built wheel works outside the checkout: it is built from a copy of the sources, installed into a fresh
folder (no network: the dependencies are the test interpreter's own), and run from a directory that is not the
checkout, so a module or data file missing from the wheel fails here rather than for a user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = """
import json, sys
from pathlib import Path
import vipalloc
target = Path(sys.argv[1]).resolve()
assert Path(vipalloc.__file__).resolve().is_relative_to(target), vipalloc.__file__  # the wheel, not the checkout
from vipalloc import Allocator
alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8)
ids = [f"q{i}" for i in range(4)]
plan = alloc.plan(ids, budget=16, step=0)
assert int(plan.counts.sum()) == 16
alloc.observe(ids, [[1.0] * int(n) for n in plan.counts], step=0)
import importlib, importlib.resources
mods = ["vipalloc.integrations.trl", "vipalloc.integrations.verl", "vipalloc.integrations.verl_trainer",
        "vipalloc.training.trainer", "vipalloc.bench.cli", "vipalloc.replay"]
for m in mods:
    importlib.import_module(m)
cfg = importlib.resources.files("vipalloc.integrations") / "verl_config"
yamls = sorted(p.name for p in cfg.iterdir() if p.name.endswith(".yaml"))
assert yamls == ["vip_trainer.yaml"], yamls
assert (cfg / "vip" / "default.yaml").is_file()
print(json.dumps({"ok": True, "modules": len(mods)}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    src = tmp_path / "src-copy"  # build from a copy: the checkout gets no build/ or egg-info litter
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"  # offline: nothing is fetched
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)], tmp_path, env)
    (wheel,) = wheels.glob("vipalloc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every module of the source tree is in the wheel (subpackages included), and the plug-ins' packaged configs
    expected = {
        str(p.relative_to(ROOT / "src"))
        for p in (ROOT / "src" / "vipalloc").rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    assert sorted(expected - names) == []
    target = tmp_path / "site"
    _run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target), str(wheel)], tmp_path, env
    )
    away = tmp_path / "elsewhere"  # neither the checkout nor the install folder is the working directory
    away.mkdir()
    env["PYTHONPATH"] = str(target)
    out = _run([sys.executable, "-c", SMOKE, str(target)], away, env)
    assert '"ok": true' in out.stdout
    script = target / "bin" / "vipalloc"
    assert script.is_file(), sorted(p.name for p in (target / "bin").iterdir())
    helped = _run([sys.executable, str(script), "--help"], away, env)
    assert "allocate" in helped.stdout and "bench" in helped.stdout
    planned = _run([sys.executable, str(script), "bench", "--help"], away, env)
    assert "simulate" in planned.stdout
