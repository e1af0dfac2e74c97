"""A wheel built from the repo installs into a fresh virtual environment (no dev extras), imports every
module and runs the model: what a reader gets from `pip install`."""
import configparser
import re
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

# A tiny model: a forward pass and generation work from the installed package alone.
import torch
from llm_from_scratch.core import set_seed
from llm_from_scratch.generate import generate
from llm_from_scratch.model import GPTModel
set_seed(0)
cfg = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)
model = GPTModel(cfg).eval()
idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
with torch.no_grad():
    logits = model(idx)
assert logits.shape == (2, 3, 97) and torch.isfinite(logits).all()
out = generate(model, idx, max_new_tokens=5, context_size=16)
assert out.shape == (2, 8) and torch.equal(out[:, :3], idx)
# greedy generation is the argmax of the logits, token by token
assert torch.equal(out[:, 3], logits[:, -1].argmax(-1))
print("imported", len(names), "modules:", " ".join(sorted(names)), "| forward and generate ok")
"""


def _dist_name():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]["lib_name"]


def test_distribution_name_is_ours_not_the_unrelated_pypi_project():
    # `pip install llm_from_scratch` (or llm-from-scratch) fetches somebody else's project from PyPI.
    name = _dist_name()
    assert re.sub(r"[-_.]+", "-", name).lower() == "llm-from-scratch-course"
    for doc in ("README.md", "CONTRIBUTING.md"):
        text = (ROOT / doc).read_text()
        assert not re.search(r"pip install\s+(-U\s+)?llm[-_]from[-_]scratch(\s|$|\[)", text), f"{doc} installs the wrong project"


def test_wheel_installs_imports_and_runs_without_dev_extras(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("llm_from_scratch_course-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [l for l in meta.splitlines() if l.startswith("Requires-Dist")]
    assert "Name: llm-from-scratch-course" in meta
    assert "llm_from_scratch/core.py" in names and "llm_from_scratch/model.py" in names
    assert not any(("nbdev" in r or "fastcore" in r) and "extra" not in r for r in requires), requires
    assert not any(n.startswith(("nbs/", "tests/")) for n in names)

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    torch_pin = "torch==" + torch.__version__.split("+")[0]     # the build already here, not a fresh CUDA one
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel), torch_pin], check=True)
    out = subprocess.run([str(py), "-c", CHECK], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "forward and generate ok" in out.stdout and "core" in out.stdout


def test_readme_imports_exist():
    """Every `from llm_from_scratch... import ...` line in the README's examples imports (catches renames)."""
    text = (ROOT / "README.md").read_text()
    lines = re.findall(r"^from llm_from_scratch[\w.]* import .+$", text, re.M)
    assert len(lines) >= 5, "the README's library example should show its imports"
    for line in lines:
        exec(line, {})
