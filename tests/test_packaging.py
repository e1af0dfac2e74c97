"""A wheel built from the repo installs into a fresh virtual environment (no dev extras), imports every
module and runs the model: what a reader gets from `pip install`."""
import configparser
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def plain_env(tmp_path_factory):
    """A fresh virtual environment holding only the wheel and its runtime requirements: a reader's install."""
    tmp = tmp_path_factory.mktemp("plain")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("llm_from_scratch_course-*.whl")
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    torch_pin = "torch==" + torch.__version__.split("+")[0]     # the build already here, not a fresh CUDA one
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel), torch_pin], check=True)
    return wheel, py, tmp


def test_wheel_installs_imports_and_runs_without_dev_extras(plain_env):
    wheel, py, tmp = plain_env
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [l for l in meta.splitlines() if l.startswith("Requires-Dist")]
    assert "Name: llm-from-scratch-course" in meta
    assert "llm_from_scratch/core.py" in names and "llm_from_scratch/model.py" in names
    assert not any(("nbdev" in r or "fastcore" in r) and "extra" not in r for r in requires), requires
    assert not any(n.startswith(("nbs/", "tests/")) for n in names)
    out = subprocess.run([str(py), "-c", CHECK], check=True, capture_output=True, text=True, cwd=tmp)
    assert "forward and generate ok" in out.stdout and "core" in out.stdout


RUN_NOTEBOOKS = r"""
import glob, os, sys
import nbformat
from nbclient import NotebookClient
failed = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.ipynb"))):
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
    except Exception as e:
        failed.append(f"{os.path.basename(path)}: {str(e)[-400:]}")
print("FAILED:", failed if failed else "none")
"""


def test_every_notebook_runs_in_a_plain_install_with_jupyter(plain_env):
    """What a reader does on Binder or a fresh machine: the wheel plus a Jupyter kernel, no dev extras and no
    ipywidgets (JupyterLab does not bring it), then "run all" on every notebook (smoke profile)."""
    wheel, py, tmp = plain_env
    subprocess.run([str(py), "-m", "pip", "install", "-q", "nbclient", "ipykernel", "nbformat"], check=True)
    missing = subprocess.run([str(py), "-c", "import ipywidgets"], capture_output=True)
    assert missing.returncode != 0, "the plain environment should not have ipywidgets"
    env = {**os.environ, "LLM_FROM_SCRATCH_PROFILE": "smoke", "MPLBACKEND": "Agg"}
    out = subprocess.run([str(py), "-c", RUN_NOTEBOOKS, str(ROOT / "nbs"), str(tmp)], capture_output=True,
                         text=True, env=env, cwd=tmp)
    assert "FAILED: none" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


def test_readme_imports_exist():
    """Every `from llm_from_scratch... import ...` line in the README's examples imports (catches renames)."""
    text = (ROOT / "README.md").read_text()
    lines = re.findall(r"^from llm_from_scratch[\w.]* import .+$", text, re.M)
    assert len(lines) >= 5, "the README's library example should show its imports"
    for line in lines:
        exec(line, {})
