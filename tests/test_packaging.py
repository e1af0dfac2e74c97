"""A wheel built from the repo installs into a fresh virtual environment and imports without nbdev."""
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib, pkgutil, sys
import llm_from_scratch
assert llm_from_scratch.__file__.startswith(sys.prefix), llm_from_scratch.__file__   # the installed copy
names = [m.name for m in pkgutil.iter_modules(llm_from_scratch.__path__) if not m.name.startswith("_")]
for name in names:
    importlib.import_module(f"llm_from_scratch.{name}")
for dev_only in ("nbdev", "fastcore", "execnb", "transformers", "pytest"):
    assert dev_only not in sys.modules, f"{dev_only} was imported by the library"
    try:
        importlib.import_module(dev_only)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"{dev_only} is installed in the fresh environment")
print("imported", len(names), "modules:", " ".join(sorted(names)))
"""


def test_wheel_installs_and_imports_without_nbdev(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("llm_from_scratch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith("METADATA"))
        requires = [l for l in zf.read(meta).decode().splitlines() if l.startswith("Requires-Dist")]
    assert "llm_from_scratch/core.py" in names and "llm_from_scratch/download.py" in names
    assert not any("nbdev" in r and "extra" not in r for r in requires), requires
    assert not any(n.startswith(("nbs/", "tests/")) for n in names)

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    torch_pin = "torch==" + torch.__version__.split("+")[0]     # the build already here, not a fresh CUDA one
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel), torch_pin], check=True)
    out = subprocess.run([str(py), "-c", CHECK], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "imported" in out.stdout and "core" in out.stdout
