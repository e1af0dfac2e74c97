"""Prose follows outputs: every measured-looking number in a notebook's text must be one its outputs or code show.

What counts as a number to check (in markdown cells):
  * a decimal (0.797, 18.2), a percentage (85.87 %), a ratio (1.75x), a time (12 s, 18.2 min, 250 ms).
Where it must appear: in the same notebook's stored outputs or code, exactly as written (thousands separators
ignored). "about 18 minutes" may be a rounding of a number shown ("about", "roughly", "around", "nearly", "~").
What is exempt: numbers marked as someone else's, by a reference word in the same sentence, the same table row
or the header of the same table column (book, series, paper, reference, published, a citation such as
"(Radford et al., 2019)"); numbers in inline code, math, links' addresses, version strings and section numbers.
A unit that names another part or appendix ("part 22", "appendix E") may quote that notebook's outputs too.
Code comments are checked too: a number with a unit (`# 160 tokens`) must appear in that cell's code or
outputs, or in the notebook's outputs.

Run as a script (`python tests/test_prose_numbers.py`) for a count of what is checked per notebook.
"""
from __future__ import annotations

import io
import json
import math
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NBS = sorted((Path(__file__).resolve().parent.parent / "nbs").glob("*.ipynb"))

REFERENCE = re.compile(
    r"\b(book|book's|books|series|series'|paper|papers|reference|references|published|publishes|raschka|"
    r"radford|vaswani|brown|ouyang|et al)\b|\(\s*[A-Z][\w-]+(?: et al\.?| and [A-Z][\w-]+)?,? \d{4}\s*\)", re.I)
OLD_EDITION = re.compile(r"\b(said|old|earlier edition|was)\b", re.I)   # a log's column quoting what a part used to say
APPROX = re.compile(r"(about|roughly|around|nearly|near|almost|approximately|some|~|≈)\s*$", re.I)
UNIT_TIME = r"(?:ms|µs|us|ns|s|sec|secs|seconds?|min|mins|minutes?|h|hours?)"
# One pattern, four kinds; group "num" is the number as written.
NUMBER = re.compile(
    r"(?:(?<=[\s(]x)|(?<=[\s(]×)|(?<![\w.\-/]))(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+)"
    r"(?:(?P<pct>\s?%)|(?P<ratio>\s?[x×](?![\w]))|(?P<time>\s?" + UNIT_TIME + r"\b(?![-/]))|(?![\d.]\d))")
NOT_A_MEASUREMENT = re.compile(              # section numbers, versions, dates: not claims about an output
    r"(section|sections|chapter|chapters|figure|listing|table|appendix|equation|eq\.|step|python|torch|"
    r"pytorch|version|v|nbdev|jupyter book|cuda|numpy|cc by|cc-by|apache|§)\s*$", re.I)
SECTION_LIST = re.compile(r"\b(sections?|chapters?)\b[^!?]{0,200}?(,|\band|\bto|-|–)\s*$", re.I)
CROSS_REF = re.compile(r"\b(part|parts)\s+(\d+b?)\b|\bappendix\s+([A-Z])\b", re.I)
COMMENT_UNITS = re.compile(
    r"(?<![\w.])(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)\s?(?P<unit>%|x\b|×|tokens?\b|ms\b|s\b|"
    r"min\b|seconds?\b|minutes?\b|MB\b|GB\b|MiB\b|GiB\b|KB\b|KiB\b)")


def canon(num: str) -> str:
    return num.replace(",", "")


def numbers_in(text: str) -> set[str]:
    "Every number in `text` (outputs, code), thousands separators dropped; '1e-3' style kept as its mantissa too."
    return {canon(m) for m in re.findall(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?", text)}


def _in(num: str, corpus: set[str]) -> bool:
    "Is `num` shown, as written or with trailing zeros (48 and 48.0, 0.30 and 0.3), not as a rounding?"
    if num in corpus:
        return True
    value = float(num)
    return any(float(c) == value for c in corpus)


def _strip_code_and_links(md: str) -> str:
    md = re.sub(r"```.*?```", " ", md, flags=re.S)                       # fenced code
    md = re.sub(r"`[^`]*`", " ", md)                                     # inline code
    md = re.sub(r"\$\$.*?\$\$|\$[^$\n]*\$", " ", md, flags=re.S)         # math
    md = re.sub(r"\]\([^)]*\)", "]", md)                                 # link targets
    md = re.sub(r"https?://\S+", " ", md)                                # bare URLs
    md = re.sub(r"<[^>]+>", " ", md)                                     # html tags
    md = re.sub(r'"[^"\n]*"|“[^”\n]*”', " ", md)                         # quotations: what someone (a part) said
    md = re.sub(r"\b\d{4}-\d{2}-\d{2}\b", " ", md)                       # dates
    md = re.sub(r"\b\d+(?:\.\d+){2,}\b", " ", md)                        # versions such as 2.13.0
    return md


def _units(md: str):
    "Yield (text, is_reference) units: table rows (with their columns' headers) and sentences."
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            header = [h.strip() for h in lines[i].strip().strip("|").split("|")]
            ref_cols = {k for k, h in enumerate(header) if REFERENCE.search(h) or OLD_EDITION.search(h)}
            part_col = 0 if header and re.fullmatch(r"parts?", header[0], re.I) else None
            yield lines[i], bool(REFERENCE.search(lines[i])) and not ref_cols  # header text itself
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                row_ref = bool(REFERENCE.search(cells[0])) if cells else False
                parts = ""
                if part_col is not None and cells:                 # a log's "part" column: "2", "8, 9, 10", "home", "C"
                    parts = " ".join([f"part {n}" for n in re.findall(r"\d+b?", cells[0])]
                                     + [f"appendix {x}" for x in re.findall(r"\b([A-Z])\b", cells[0])])
                for k, cell in enumerate(cells):
                    yield f"{cell} [{parts}]" if parts else cell, row_ref or k in ref_cols or bool(REFERENCE.search(cell))
                i += 1
            continue
        para = []
        while i < len(lines) and not (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                                      and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1])):
            if not lines[i].strip() or re.match(r"^\s*([*+-]|\d+\.)\s", lines[i]) or lines[i].startswith("#"):
                if para:
                    yield from _sentences(" ".join(para))
                    para = []
            if lines[i].strip():
                para.append(lines[i].strip())
            i += 1
        if para:
            yield from _sentences(" ".join(para))


def _sentences(text: str):
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z*(\[\"'])", text):
        yield s, bool(REFERENCE.search(s))


def _rounds_to(num: str, corpus: set[str]) -> bool:
    "Is some shown number equal to `num` rounded to num's precision ('4,200' to the hundred, '18.2' to a tenth)?"
    if "." in num:
        half = 0.5 * 10 ** -len(num.split(".")[1])
    else:
        half = 0.5 * 10 ** (len(num) - len(num.rstrip("0")) if num.strip("0") else 0)
    target = float(num)
    for c in corpus:
        try:
            if abs(float(c) - target) <= half + 1e-12:
                return True
        except ValueError:
            continue
    return False


_SCALE = {"%": 100, "ms": 1e3, "µs": 1e6, "us": 1e6, "ns": 1e9, "min": 1 / 60, "mins": 1 / 60, "minute": 1 / 60,
          "minutes": 1 / 60, "h": 1 / 3600, "hour": 1 / 3600, "hours": 1 / 3600}


def _same_value(num: str, kind: str | None, written: str, corpus: set[str]) -> bool:
    "A percentage shown as a fraction (90 % and 0.9), a time shown in another unit (20 ms and 0.02 s)."
    unit = re.sub(r"^[\d.,\s]+", "", written).strip()
    scale = _SCALE.get(unit) if kind in ("pct", "time") else None
    if not scale:
        return False
    target = float(num) / scale
    for c in corpus:
        try:
            if math.isclose(float(c), target, rel_tol=1e-9):
                return True
        except ValueError:
            continue
    return False


@dataclass
class Report:
    checked: int = 0
    references: int = 0
    problems: list = field(default_factory=list)


def _cells(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _output_text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        for t in [o.get("text")] + [o.get("data", {}).get(k) for k in ("text/plain", "text/markdown", "text/html")]:
            if t:
                out.append(t if isinstance(t, str) else "".join(t))
        if o.get("output_type") == "error":
            out.append(" ".join(o.get("traceback", [])))
    return "\n".join(out)


def _split_code(source: str) -> tuple[str, list[str]]:
    "(code without comments, comments) of one cell; IPython magics are left out."
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    text = "\n".join(lines) + "\n"
    comments, code = [], []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            (comments if tok.type == tokenize.COMMENT else code).append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return text, []
    return " ".join(code), comments


def _shown(path: Path) -> tuple[set[str], set[str], list]:
    "(numbers in the outputs, numbers in outputs and code, per-cell (code, comments)) of one notebook."
    cells = _cells(path)
    outputs = "\n".join(_output_text(c) for c in cells if c["cell_type"] == "code")
    code_parts = [_split_code("".join(c["source"])) for c in cells if c["cell_type"] == "code"]
    shown_outputs = numbers_in(outputs)
    return shown_outputs, shown_outputs | numbers_in(" ".join(code for code, _ in code_parts)), code_parts


def _notebook_named(ref: re.Match, near: Path) -> Path | None:
    folder = near.parent if near.parent.name == "nbs" else NBS[0].parent
    if ref.group(2):
        number = ref.group(2).lower()
        found = [p for p in folder.glob("*.ipynb") if p.stem.split("_")[0].lower() in (number, number.zfill(2))]
    else:
        found = list(folder.glob(f"appendix_{ref.group(3).lower()}_*.ipynb"))
    return found[0] if found else None


def check_notebook(path: Path) -> Report:
    cells = _cells(path)
    shown_outputs, shown, code_parts = _shown(path)
    elsewhere: dict[Path, set[str]] = {}
    rep = Report()
    for c in cells:
        if c["cell_type"] != "markdown":
            continue
        md = _strip_code_and_links("".join(c["source"]))
        for unit, is_ref in _units(md):
            for m in NUMBER.finditer(unit):
                kind = "pct" if m.group("pct") else "ratio" if m.group("ratio") else "time" if m.group("time") else None
                num = m.group("num")
                if kind is None and "." not in num:
                    continue                                  # plain integers are counts, not checked here
                before = unit[:m.start()]
                after = unit[m.end():]
                if (NOT_A_MEASUREMENT.search(before) or re.search(r"[=≈]\s*$", before) or SECTION_LIST.search(before)
                        or re.match(r"-(billion|million|parameter)", after)):
                    continue                                  # a section number, a version, a worked formula's value
                if is_ref:
                    rep.references += 1
                    continue
                rep.checked += 1
                n = canon(num)
                pool = set(shown)
                for ref in CROSS_REF.finditer(unit):
                    other = _notebook_named(ref, path)
                    if other is not None and other != path:
                        if other not in elsewhere:
                            elsewhere[other] = _shown(other)[1]
                        pool |= elsewhere[other]
                if _in(n, pool) or _same_value(n, kind, m.group(0), pool) or (APPROX.search(before) and _rounds_to(n, pool)):
                    continue
                rep.problems.append(f"{path.name}: prose says {m.group(0).strip()!r}, which no output or code shows: "
                                    f"...{unit[max(0, m.start() - 60):m.end() + 30].strip()}...")
    for c, (code, comments) in zip([c for c in cells if c["cell_type"] == "code"], code_parts):
        own = numbers_in(code) | numbers_in(_output_text(c)) | shown_outputs
        for comment in comments:
            if REFERENCE.search(comment):
                continue
            for m in COMMENT_UNITS.finditer(comment):
                if NOT_A_MEASUREMENT.search(comment[:m.start()]):
                    continue
                rep.checked += 1
                if not _in(canon(m.group("num")), own):
                    rep.problems.append(f"{path.name}: comment {comment.strip()!r} says {m.group(0)!r}, "
                                        "which neither its cell nor any output shows")
    return rep


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_prose_numbers_appear_in_outputs_or_code(path):
    rep = check_notebook(path)
    assert not rep.problems, "\n".join(rep.problems)


# The checker itself must catch what it was built for and stay quiet on what is fine.
def _fake_nb(tmp_path, md: str, code: str = "x = 1", output: str = "") -> Path:
    nb = {"cells": [{"cell_type": "markdown", "source": md, "metadata": {}},
                    {"cell_type": "code", "source": code, "metadata": {}, "outputs":
                     [{"output_type": "stream", "name": "stdout", "text": output}]}]}
    p = tmp_path / "x.ipynb"
    p.write_text(json.dumps(nb))
    return p


def test_checker_catches_a_stale_ratio_and_a_stale_comment(tmp_path):
    rep = check_notebook(_fake_nb(tmp_path, "The fast path is 1.76x faster.", output="speed-up: 1.75x"))
    assert len(rep.problems) == 1 and "1.76x" in rep.problems[0]
    rep = check_notebook(_fake_nb(tmp_path, "Long messages.", code='s = "Free entry! " * 40  # 160 tokens',
                                  output="121 tokens"))
    assert len(rep.problems) == 1 and "160 tokens" in rep.problems[0]


def test_checker_reads_a_growth_factor_written_before_the_number(tmp_path):
    """Part 27 wrote "grew x2.70" for a while after its output said x2.06: a factor written as "x2.70" is checked too."""
    rep = check_notebook(_fake_nb(tmp_path, "From 513 to 1024 tokens its time grew x2.70.", output="time x2.06 measured"))
    assert len(rep.problems) == 1 and "2.70" in rep.problems[0]
    rep = check_notebook(_fake_nb(tmp_path, "From 513 to 1024 tokens its time grew x2.06.", output="time x2.06 measured"))
    assert rep.problems == [] and rep.checked == 1


def test_checker_accepts_shown_numbers_references_and_roundings(tmp_path):
    md = ("Accuracy reached 85.87 % in 2.39 min, about 18 minutes for all runs. The book reports 97.21 %.\n\n"
          "| measurement | ours | book (reference) |\n|---|---|---|\n| accuracy | 85.87 % | 95.67 % |\n\n"
          "GPT-2 saw 40 GB (Radford et al., 2019) and section 5.5 covers it; torch 2.13.0.")
    rep = check_notebook(_fake_nb(tmp_path, md, output="test accuracy 85.87% after 2.39 min; all: 18.2 min"))
    assert not rep.problems, rep.problems
    assert rep.references == 2 and rep.checked == 4


def test_checker_flags_a_rounding_the_output_does_not_show(tmp_path):
    rep = check_notebook(_fake_nb(tmp_path, "Accuracy reached 85.9 %.", output="accuracy 85.87%"))
    assert len(rep.problems) == 1


if __name__ == "__main__":
    total_checked = total_refs = total_problems = 0
    for p in (Path(a) for a in sys.argv[1:]) if sys.argv[1:] else NBS:
        r = check_notebook(p)
        total_checked += r.checked
        total_refs += r.references
        total_problems += len(r.problems)
        print(f"{p.stem:32} checked {r.checked:4}  references {r.references:4}  problems {len(r.problems)}")
        for line in r.problems:
            print("   ", line)
    print(f"{'all notebooks':32} checked {total_checked:4}  references {total_refs:4}  problems {total_problems}")
