"""Sphinx glue between nbdev notebooks and Jupyter Book 1 (loaded from _config.yml).

* nbdev's `#| default_exp` and `#| hide` cells are bookkeeping: they are removed from the rendered page
  (the `remove-cell` tag), without touching the notebook files.
* The `#|` directive lines themselves are dropped from the rendered code (readers see the code only).
* `#| eval: false` cells get Jupyter Book's `skip-execution` tag, so `make book EXECUTE=1` skips them too.
* ipywidgets 8's static widget manager typesets widget labels with MathJax 2's `MathJax.Hub.Queue`, but
  the book loads MathJax 3, which has no `Hub`: every saved widget threw a TypeError. A small shim maps
  the call onto MathJax 3's `typesetPromise`.
* Jupyter Book 1 registers sphinx-thebe's inline config script twice, which raises a JavaScript error
  ("Identifier 'THEBE_JS_URL' has already been declared"); identical scripts are dropped from each page.
"""
import json
import re

_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")


def _directives(source: str) -> list[str]:
    out = []
    for line in source.splitlines():
        m = _DIRECTIVE.match(line)
        if not m:
            break
        out.append(m.group(1))
    return out


def _tag_cells(app, docname, source):
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    nb = json.loads(source[0])
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        dirs = _directives(text)
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        code_lines = [l for l in text.splitlines() if l.strip() and not _DIRECTIVE.match(l)]
        if any(d.startswith("hide") for d in dirs) or (dirs and not code_lines):
            tags.append("remove-cell")
        if any(re.match(r"eval\s*:\s*false", d) for d in dirs):
            tags.append("skip-execution")
        if dirs:
            lines = text.splitlines(keepends=True)
            cell["source"] = "".join(lines[len(dirs):]).lstrip("\n")
    source[0] = json.dumps(nb)


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        key = (str(getattr(js, "filename", js) or ""),   # Sphinx re-adds inline scripts with filename "" instead of None
               tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept


_MATHJAX2_SHIM = """
(function () {
  function shim() {
    var mj = window.MathJax;
    if (mj && !mj.Hub) {
      mj.Hub = {Queue: function (job) {
        var el = job && job[2];
        if (el && window.MathJax.typesetPromise) window.MathJax.typesetPromise([el]);
      }};
    }
  }
  shim();
  document.addEventListener("DOMContentLoaded", shim);
  window.addEventListener("load", shim, true);
})();
"""


def setup(app):
    app.add_js_file(None, body=_MATHJAX2_SHIM, priority=900)            # after MathJax's own config script
    app.connect("source-read", _tag_cells)
    app.connect("html-page-context", _dedupe_scripts, priority=1000)   # after everyone who adds scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
