"""Course-wide invariants of the notebooks and the library they generate."""
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
PARTS = [p for p in NBS if re.match(r"\d\d", p.name)]


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _default_exp(path):
    for cell in _cells(path):
        m = re.search(r"^#\s*\|\s*default_exp\s+(\S+)", _src(cell), re.M)
        if m:
            return m.group(1)
    return None


def test_every_notebook_is_in_the_toc_and_every_toc_entry_exists():
    toc = (ROOT / "_toc.yml").read_text()
    listed = set(re.findall(r"(?:root|file):\s*(\S+)", toc))
    on_disk = {f"nbs/{p.stem}" for p in NBS}
    assert on_disk <= listed, f"not in _toc.yml: {sorted(on_disk - listed)}"
    assert listed <= on_disk, f"in _toc.yml but missing: {sorted(listed - on_disk)}"


@pytest.mark.parametrize("path", PARTS, ids=lambda p: p.stem)
def test_part_has_title_summary_and_things_to_try(path):
    md = [_src(c) for c in _cells(path) if c["cell_type"] == "markdown"]
    assert md and re.match(r"#\s+Part\s+\d+b?\b", md[0]), f"{path.name}: first markdown cell must be '# Part N: ...'"
    text = "\n".join(md)
    assert re.search(r"^##\s+Summary", text, re.M), f"{path.name} has no '## Summary'"
    assert re.search(r"^##\s+Things to try", text, re.M), f"{path.name} has no '## Things to try'"


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_without_errors(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert outputs, f"{path.name} has no stored outputs: execute it before committing (see CONTRIBUTING.md)"
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name} stores an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_each_module_has_exactly_one_owner():
    owners = {}
    for path in NBS:
        mod = _default_exp(path)
        if mod:
            assert mod not in owners, f"{mod} is exported by {owners[mod]} and {path.name}"
            owners[mod] = path.name
    generated = {p.stem for p in (ROOT / "llm_from_scratch").glob("*.py") if not p.stem.startswith("_")}
    assert generated == set(owners), f"modules without an owning notebook: {generated - set(owners)}"


def _exported_symbols():
    for path in NBS:
        mod = _default_exp(path)
        if not mod:
            continue
        module = importlib.import_module(f"llm_from_scratch.{mod}")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield mod, name, obj


def test_exported_functions_and_classes_say_where_they_are_defined():
    missing = []
    for mod, name, obj in _exported_symbols():
        if inspect.isclass(obj) and issubclass(obj, Exception):
            continue                      # error classes are documented by their base class
        if not re.search(r"\b(part \d+b?|course home)\b", obj.__doc__ or "", re.I):
            missing.append(f"{mod}.{name}")
    assert not missing, "docstrings should say '(defined in part N)': " + ", ".join(missing)
