"""The built book (`make book`, which `make test` runs first) in a real headless browser.

Checks what a reader sees without a kernel: every page loads without JavaScript errors, the static
attention explorer draws a heatmap and switches heads, the perplexity explorer's slider changes its bars,
no page shows a saved ipywidget control (a slider or text box that cannot do anything without a kernel),
and the saved widgets that remain (display-only, such as progress bars) render from the locally vendored
widget manager."""
import functools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
PAGES = sorted((HTML / "nbs").glob("*.html")) if HTML.exists() else []

pytestmark = pytest.mark.skipif(not (HTML / "nbs" / "index.html").exists(),
                                reason="the book is not built: run `make book` (make test does)")


def _open(browser, name):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((HTML / "nbs" / name).as_uri())
    page.wait_for_load_state("load")
    return page, errors


def test_every_part_is_in_the_book():
    notebooks = {p.stem for p in (ROOT / "nbs").glob("*.ipynb")}
    assert notebooks == {p.stem for p in PAGES}


@pytest.mark.parametrize("name", [p.name for p in PAGES])
def test_page_renders_without_javascript_errors(browser, name):
    page, errors = _open(browser, name)
    assert page.locator("article h1").count() >= 1, f"{name} has no title"
    assert errors == [], f"{name}: {errors}"
    page.close()


def test_part_02_screenshot(browser):
    page, errors = _open(browser, "02_tokenization.html")
    assert "Part 2" in page.locator("article h1").first.inner_text()
    assert page.locator("div.cell_output").count() > 5                # stored outputs are rendered
    page.screenshot(path="/tmp/book_part02.png")
    assert errors == []


def test_attention_explorer_in_the_book_switches_heads(browser):
    page, errors = _open(browser, "12_multi_head_attention.html")
    explorer = page.locator(".lfs-attn").filter(has=page.locator("select.lfs-head")).first
    cells = explorer.locator(".lfs-cell")
    assert cells.count() > 0
    before = [c.get_attribute("data-w") for c in cells.all()]
    options = explorer.locator("select.lfs-head option")
    assert options.count() >= 2
    explorer.locator("select.lfs-head").select_option(options.nth(1).get_attribute("value"))
    after = [c.get_attribute("data-w") for c in cells.all()]
    assert after != before, "choosing another head must redraw the heatmap"
    explorer.screenshot(path="/tmp/book_attention_explorer.png")
    assert errors == []


def test_causal_explorer_in_part_09_masks_the_future(browser):
    page, errors = _open(browser, "09_causal_attention.html")
    explorer = page.locator(".lfs-attn").first
    n = explorer.locator(".lfs-q").count()
    weights = [float(c.get_attribute("data-w")) for c in explorer.locator(".lfs-cell").all()]
    assert len(weights) == n * n
    assert all(weights[i * n + j] == 0 for i in range(n) for j in range(i + 1, n))   # nothing above the diagonal
    assert errors == []


def test_perplexity_explorer_in_the_book_follows_the_slider(browser):
    page, errors = _open(browser, "21_perplexity.html")
    root = page.locator(".lfs-ppx").first
    root.locator(".ppx-tok").nth(2).click()
    bars = lambda: [f.get_attribute("style") for f in root.locator(".ppx-detail .ppx-fill").all()]
    before, mean_before = bars(), root.locator(".ppx-sum").get_attribute("data-mean")
    root.locator("input.ppx-temp").evaluate("el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
    assert bars() != before and root.locator(".ppx-sum").get_attribute("data-mean") != mean_before
    root.screenshot(path="/tmp/book_perplexity_explorer.png")
    assert errors == []


# Widget models that only display something. Anything else saved in a page (a slider, a text box, a
# dropdown, a button...) would be a control that silently does nothing there: live explorers keep their
# output out of the book with the `remove-output` cell tag (see appendix B).
DISPLAY_ONLY = {"HBoxModel", "VBoxModel", "BoxModel", "GridBoxModel", "HTMLModel", "HTMLMathModel", "LabelModel",
                "FloatProgressModel", "IntProgressModel", "ImageModel", "OutputModel", "LayoutModel"}
_VIEW = re.compile(r'<script type="application/vnd\.jupyter\.widget-view\+json">(.*?)</script>', re.S)
_STATE = re.compile(r'<script type="application/vnd\.jupyter\.widget-state\+json">(.*?)</script>', re.S)


def _saved_widgets(page):
    """(model ids of the widget views a page shows, {model id: saved model}) from a built page."""
    text = page.read_text(encoding="utf-8")
    views = [json.loads(m)["model_id"] for m in _VIEW.findall(text)]
    state = {}
    for m in _STATE.findall(text):
        state.update(json.loads(m).get("state", {}))
    return views, state


def _reachable(model_id, state):
    """The model and every model it refers to (children, layouts, styles...)."""
    seen, todo = set(), [model_id]
    while todo:
        mid = todo.pop()
        if mid in seen or mid not in state:
            continue
        seen.add(mid)
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(state[mid].get("state", {})))
    return seen


@functools.lru_cache(maxsize=None)
def _views_by_page():
    return {p.name: _saved_widgets(p) for p in PAGES}


@pytest.mark.parametrize("name", [p.name for p in PAGES])
def test_no_page_shows_a_saved_widget_control(name):
    views, state = _views_by_page()[name]
    controls = sorted({state[m]["model_name"] for v in views for m in _reachable(v, state)
                       if not state[m]["model_name"].endswith("StyleModel")
                       and state[m]["model_name"] not in DISPLAY_ONLY})
    assert not controls, (f"{name} shows saved ipywidget controls {controls}: they do nothing without a kernel. "
                          "Tag the cell that displays a live widget `remove-output` (see appendix B).")


@pytest.mark.parametrize("name", ["05_self_attention.html", "21_perplexity.html", "appendix_b_explorers.html"])
def test_live_explorers_are_labelled_and_left_out_of_the_page(browser, name):
    page, errors = _open(browser, name)
    page.wait_for_timeout(500)                                        # give the widget manager time to draw
    assert "running kernel" in page.locator("article").inner_text()   # the reader is told why nothing shows
    live = ".jupyter-widgets input, .jupyter-widgets select, .jupyter-widgets textarea, .jupyter-widgets button"
    assert page.locator(live).count() == 0
    assert page.locator(".lfs-attn, .lfs-ppx").count() > 0           # the static explorers are there instead
    assert errors == []


def test_both_explorers_work_in_appendix_b(browser):
    page, errors = _open(browser, "appendix_b_explorers.html")
    assert page.locator(".lfs-attn .lfs-cell").count() > 0
    root = page.locator(".lfs-ppx").first
    root.locator(".ppx-tok").nth(2).click()
    before = [f.get_attribute("style") for f in root.locator(".ppx-detail .ppx-fill").all()]
    root.locator("input.ppx-temp").evaluate("el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
    assert [f.get_attribute("style") for f in root.locator(".ppx-detail .ppx-fill").all()] != before
    assert errors == []


def _pages_with_saved_widgets():
    return [n for n, (views, _) in _views_by_page().items() if views]


def test_saved_display_widgets_render_from_local_files(browser):
    names = _pages_with_saved_widgets()
    if not names:
        pytest.skip("no page holds a saved widget (e.g. a progress bar) today")
    for name in names:
        page, errors = _open(browser, name)
        page.wait_for_selector(".jupyter-widgets", timeout=15_000)    # drawn by the vendored manager
        assert errors == [], f"{name}: {errors}"
        page.close()


def test_formulas_are_typeset_from_the_local_mathjax(browser):
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((HTML / "nbs" / "20_cross_entropy.html").as_uri())
    page.wait_for_selector("mjx-container", timeout=20_000)          # MathJax replaced the TeX with its output
    assert page.locator("mjx-container").count() >= 20
    assert not any("cdn." in u or "jsdelivr" in u for u in requests), "the book must not need a CDN"
    assert any(u.endswith("_static/mathjax/tex-mml-chtml.js") or "_static/mathjax/tex-mml-chtml.js?" in u
               for u in requests)
    assert errors == []
