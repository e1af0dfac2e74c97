"""Course-wide invariants of the notebooks and the library they generate."""
import ast
import configparser
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
PARTS = [p for p in NBS if re.match(r"\d\d", p.name)]
APPENDICES = [p for p in NBS if p.name.startswith("appendix_")]

# Each part's post in the series (Giles Thomas, "Writing an LLM from scratch").
SERIES = {
    "1": "https://www.gilesthomas.com/2024/12/llm-from-scratch-1",
    "2": "https://www.gilesthomas.com/2024/12/llm-from-scratch-2",
    "3": "https://www.gilesthomas.com/2024/12/llm-from-scratch-3",
    "4": "https://www.gilesthomas.com/2024/12/llm-from-scratch-4",
    "5": "https://www.gilesthomas.com/2025/01/llm-from-scratch-5-self-attention",
    "6": "https://www.gilesthomas.com/2025/01/llm-from-scratch-6-coding-self-attention-part-1",
    "6b": "https://www.gilesthomas.com/2025/01/llm-from-scratch-6b-correction",
    "7": "https://www.gilesthomas.com/2025/02/llm-from-scratch-7-coding-self-attention-part-2",
    "8": "https://www.gilesthomas.com/2025/03/llm-from-scratch-8-trainable-self-attention",
    "9": "https://www.gilesthomas.com/2025/03/llm-from-scratch-9-causal-attention",
    "10": "https://www.gilesthomas.com/2025/03/llm-from-scratch-10-dropout",
    "11": "https://www.gilesthomas.com/2025/04/llm-from-scratch-11-batches",
    "12": "https://www.gilesthomas.com/2025/04/llm-from-scratch-12-multi-head-attention",
    "13": "https://www.gilesthomas.com/2025/05/llm-from-scratch-13-taking-stock-part-1-attention-heads-are-dumb",
    "14": "https://www.gilesthomas.com/2025/05/llm-from-scratch-14-taking-stock-part-2-the-complexity-of-self-attention-at-scale",
    "15": "https://www.gilesthomas.com/2025/05/llm-from-scratch-15-from-context-vectors-to-logits",
    "16": "https://www.gilesthomas.com/2025/07/llm-from-scratch-16-layer-normalisation",
    "17": "https://www.gilesthomas.com/2025/08/llm-from-scratch-17-the-feed-forward-network",
    "18": "https://www.gilesthomas.com/2025/08/llm-from-scratch-18-residuals-shortcut-connections-and-the-talmud",
    "19": "https://www.gilesthomas.com/2025/08/llm-from-scratch-19-wrapping-up-chapter-4",
    "20": "https://www.gilesthomas.com/2025/10/llm-from-scratch-20-starting-training-cross-entropy-loss",
    "21": "https://www.gilesthomas.com/2025/10/llm-from-scratch-21-perplexed-by-perplexity",
    "22": "https://www.gilesthomas.com/2025/10/llm-from-scratch-22-finally-training-our-llm",
    "23": "https://www.gilesthomas.com/2025/10/llm-from-scratch-23-fine-tuning-classification",
    "24": "https://www.gilesthomas.com/2025/10/llm-from-scratch-24-the-transcript-hack",
    "25": "https://www.gilesthomas.com/2025/10/llm-from-scratch-25-instruction-fine-tuning",
    "26": "https://www.gilesthomas.com/2025/11/llm-from-scratch-26-evaluating-the-fine-tuned-model",
    "27": "https://www.gilesthomas.com/2025/11/llm-from-scratch-27-whats-left-and-whats-next",
}


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _markdown(path):
    return [_src(c) for c in _cells(path) if c["cell_type"] == "markdown"]


def _part_number(path):
    return re.match(r"0?(\d+b?)_", path.name).group(1)


def _exported_modules(path):
    """Modules a notebook writes: its `default_exp` and any `#| export NAME` cells."""
    default, named = None, set()
    for cell in _cells(path):
        if cell["cell_type"] != "code":
            continue
        src = _src(cell)
        m = re.search(r"^#\s*\|\s*default_exp\s+(\S+)", src, re.M)
        if m:
            default = m.group(1)
        for m in re.finditer(r"^#\s*\|\s*export\s+(\w+)\s*$", src, re.M):
            named.add(m.group(1))
    return default, named


def test_every_notebook_is_in_the_toc_and_every_toc_entry_exists():
    toc = (ROOT / "_toc.yml").read_text()
    listed = set(re.findall(r"(?:root|file):\s*(\S+)", toc))
    on_disk = {f"nbs/{p.stem}" for p in NBS}
    assert on_disk <= listed, f"not in _toc.yml: {sorted(on_disk - listed)}"
    assert listed <= on_disk, f"in _toc.yml but missing: {sorted(listed - on_disk)}"


@pytest.mark.parametrize("path", PARTS + APPENDICES, ids=lambda p: p.stem)
def test_page_has_title_summary_and_things_to_try(path):
    md = _markdown(path)
    title = r"#\s+Part\s+\d+b?\b" if path in PARTS else r"#\s+Appendix\s+[A-Z]\b"
    assert md and re.match(title, md[0]), f"{path.name}: first markdown cell must match {title!r}"
    text = "\n".join(md)
    assert re.search(r"^##\s+Summary", text, re.M), f"{path.name} has no '## Summary'"
    assert re.search(r"^##\s+Things to try", text, re.M), f"{path.name} has no '## Things to try'"


@pytest.mark.parametrize("path", PARTS, ids=lambda p: p.stem)
def test_part_names_its_book_chapter_and_links_its_post(path):
    first = _markdown(path)[0]
    url = SERIES[_part_number(path)]
    assert url in first, f"{path.name}: the title cell should link its post in the series, {url}"
    assert re.search(r"\bchapters?\s+\d", first, re.I), f"{path.name}: the title cell should name the book chapter"


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_without_errors(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    if path.stem == "index" and not code:
        return                            # the home page holds no code
    assert outputs, f"{path.name} has no stored outputs: execute it before committing (see CONTRIBUTING.md)"
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name} stores an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def _output_text(path):
    out = []
    for c in _cells(path):
        for o in c.get("outputs", []):
            text = o.get("text") or o.get("data", {}).get("text/plain", "")
            out.append(text if isinstance(text, str) else "".join(text))
    return "\n".join(out)


@pytest.mark.parametrize("path", PARTS + APPENDICES, ids=lambda p: p.stem)
def test_stored_outputs_say_which_profile_and_hardware_made_them(path):
    text = _output_text(path)
    m = re.search(r"^(\w+) profile on (.+)$", text, re.M)
    assert m, f"{path.name}: print(describe_run(device)) near the top, so its stored numbers name their machine"
    assert m.group(1) == "full", f"{path.name}: stored outputs come from the {m.group(1)} profile; commit a full run"


def test_each_module_has_exactly_one_owner():
    owners = {}
    for path in NBS:
        default, named = _exported_modules(path)
        for mod in ({default} if default else set()) | named:
            assert owners.get(mod, path.name) == path.name, f"{mod} is exported by {owners[mod]} and {path.name}"
            owners[mod] = path.name
    generated = {p.stem for p in (ROOT / "llm_from_scratch").glob("*.py") if not p.stem.startswith("_")}
    assert generated == set(owners), (f"modules without an owning notebook: {sorted(generated - set(owners))}; "
                                      f"owned but not generated: {sorted(set(owners) - generated)}")


def test_the_home_page_holds_no_library_code():
    default, named = _exported_modules(ROOT / "nbs" / "index.ipynb")
    assert default is None and not named, "nbs/index.ipynb is the home page: move library code to a part or appendix"


def _exported_symbols():
    for path in NBS:
        default, named = _exported_modules(path)
        for mod in ({default} if default else set()) | named:
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
        if not re.search(r"\b(part \d+b?|appendix [A-Z])\b", obj.__doc__ or "", re.I):
            missing.append(f"{mod}.{name}")
    assert not missing, "docstrings should say '(defined in part N)' or '(defined in appendix X)': " + ", ".join(missing)


def _runtime_imports():
    """Top-level import names a plain `pip install` of the library provides (settings.ini's requirements)."""
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    names = {re.split(r"[<>=!~\[ ]", r)[0].replace("-", "_") for r in cfg["DEFAULT"]["requirements"].split()}
    return names | {"llm_from_scratch", "IPython"} | set(sys.stdlib_module_names)


def _guarded(node, parents):
    """True when an import sits in a function body or in a try whose handlers catch ImportError."""
    for p in parents.get(node, []):
        if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
        if isinstance(p, ast.Try):
            for h in p.handlers:
                names = {n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)} if h.type is not None else {"Exception"}
                if names & {"ImportError", "ModuleNotFoundError", "Exception"}:
                    return True
    return False


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_plain_install(path):
    """Readers run notebooks after `pip install` of the course (no dev extras): unguarded imports must be
    the standard library, the library's runtime requirements, or IPython."""
    allowed = _runtime_imports()
    bad = []
    for cell in _cells(path):
        if cell["cell_type"] != "code":
            continue
        # IPython magics and shell lines become `pass`, keeping the indentation (they may sit in an except block).
        lines = [l[: len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith(("%", "!")) else l
                 for l in _src(cell).splitlines()]
        tree = ast.parse("\n".join(lines))
        parents = {}
        for p in ast.walk(tree):
            for child in ast.iter_child_nodes(p):
                parents[child] = parents.get(p, []) + [p]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in allowed and not _guarded(node, parents):
                    bad.append(f"{top} (line: {ast.unparse(node)})")
    assert not bad, f"{path.name} imports packages a plain install lacks, unguarded: {bad}"


def test_the_book_does_not_cite_planning_documents():
    """The book is for readers: it cites the book and the series, not our own planning files."""
    for path in NBS:
        text = "\n".join(_src(c) for c in _cells(path))
        for word in ("COURSE.md", "syllabus", "shared/data", "the issue"):
            assert word not in text, f"{path.name} mentions {word!r}"
