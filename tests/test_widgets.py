"""The explorers' module (llm_from_scratch.widgets, appendix B): input validation, the perplexity explorer's
arithmetic, and the split between lessons and machinery (which way the imports go, what the book stores)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_from_scratch.widgets import (EXPLORER_TEMPERATURES, AttentionExplorer, attention_explorer_html,
                                      attention_weights_4d, explorer_probabilities, perplexity_explorer_html,
                                      perplexity_report)

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))

TOKENS = ["the", "cat", "sat"]
W = torch.softmax(torch.randn(3, 3), dim=-1)


def test_ranks_become_4d():
    assert attention_weights_4d(TOKENS, W).shape == (1, 1, 3, 3)
    assert attention_weights_4d(TOKENS, W.expand(2, 3, 3)).shape == (1, 2, 3, 3)
    assert attention_weights_4d(TOKENS, np.ones((2, 4, 3, 3)) / 3).shape == (2, 4, 3, 3)


@pytest.mark.parametrize("bad", [W[0], W[None, None, None]])
def test_wrong_rank(bad):
    with pytest.raises(ValueError, match="rank"):
        attention_weights_4d(TOKENS, bad)


def test_shape_must_match_tokens():
    with pytest.raises(ValueError, match="does not match 2 tokens"):
        attention_weights_4d(TOKENS[:2], W)
    with pytest.raises(ValueError, match="does not match"):
        attention_weights_4d(TOKENS, torch.ones(3, 4) / 4)


def test_values_and_tokens():
    with pytest.raises(ValueError, match="not raw scores"):
        attention_weights_4d(TOKENS, W - 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        attention_weights_4d(TOKENS, W * float("inf"))
    with pytest.raises(ValueError, match="empty"):
        attention_weights_4d([], W)
    with pytest.raises(TypeError, match="list of strings"):
        attention_weights_4d("the cat sat", W)
    with pytest.raises(TypeError, match="decode token ids"):
        attention_weights_4d([1, 2, 3], W)


def test_html_layer_head_range_and_unique_ids():
    with pytest.raises(ValueError, match="layer=2 is out of range"):
        attention_explorer_html(TOKENS, W.expand(2, 2, 3, 3), layer=2)
    with pytest.raises(ValueError, match="head=5 is out of range"):
        attention_explorer_html(TOKENS, W.expand(2, 3, 3), head=5)
    a, b = attention_explorer_html(TOKENS, W), attention_explorer_html(TOKENS, W)
    assert a.count('class="lfs-cell"') == 9
    assert a.split('id="')[1][:21] != b.split('id="')[1][:21]


def test_html_escapes_tokens():
    page = attention_explorer_html(["<b>", "</script>", "x"], W)
    assert "<b>" not in page.split("<script")[0].replace('class="lfs-', "")  # escaped in the markup
    assert "</script>\"" not in page                                          # cannot close the data block


def test_live_explorer_validates():
    pytest.importorskip("ipywidgets")
    with pytest.raises(TypeError, match="weights_fn must be a function"):
        AttentionExplorer("nope")
    with pytest.raises(ValueError, match="does not match"):
        AttentionExplorer(lambda text: (text.split(), torch.ones(2, 2) / 2), text="a b c")
    ex = AttentionExplorer(lambda text: (text.split(), torch.ones(2, len(text.split()), len(text.split())) / len(text.split())),
                           text="a b c")
    assert ex.weights.shape == (1, 2, 3, 3)
    ex.text_box.value = "x y"
    assert ex.tokens == ["x", "y"]


class _Tok:
    """A character-level stand-in for a tokenizer: one token per character."""
    n_vocab = 128

    def encode(self, text, allowed_special=()):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _tiny_model():
    from llm_from_scratch.model import GPTModel
    torch.manual_seed(0)
    cfg = {"vocab_size": 128, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    return GPTModel(cfg).eval()


def test_perplexity_report_matches_the_model():
    model, tok = _tiny_model(), _Tok()
    rep = perplexity_report(model, tok, "hello there", top_n=4)
    ids = torch.tensor([tok.encode("hello there")])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
    assert rep["tokens"] == list("hello there") and len(rep["top_ids"][0]) == 4
    torch.testing.assert_close(torch.tensor(rep["surprisal"]), expected, atol=1e-4, rtol=0)
    k1 = EXPLORER_TEMPERATURES.index(1.0)
    for i in range(len(rep["surprisal"])):
        probs, other, s = explorer_probabilities(rep, i, k1)
        assert abs(sum(probs) + other - 1) < 1e-6 and s == pytest.approx(rep["surprisal"][i], abs=2e-3)


def test_perplexity_report_refuses_bad_input():
    model, tok = _tiny_model(), _Tok()
    with pytest.raises(ValueError, match="at least 2"):
        perplexity_report(model, tok, "h")
    with pytest.raises(ValueError, match="shorten the text"):
        perplexity_report(model, tok, "x" * 40)
    with pytest.raises(ValueError, match="top_n=0"):
        perplexity_report(model, tok, "hello", top_n=0)
    with pytest.raises(ValueError, match="perplexity_report"):
        perplexity_explorer_html({"tokens": []})


def test_lesson_modules_do_not_import_the_widgets():
    """`widgets` may import the lessons' modules, never the reverse (no cycles, lessons stay light)."""
    code = ("import sys, llm_from_scratch.generate, llm_from_scratch.loss, llm_from_scratch.attention; "
            "assert 'llm_from_scratch.widgets' not in sys.modules, 'a lesson module imports widgets'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _code_cells(path):
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code":
            yield cell, "".join(cell["source"])


@pytest.mark.parametrize("path", [p for p in NBS if p.stem != "appendix_b_explorers"], ids=lambda p: p.stem)
def test_lessons_carry_no_explorer_plumbing(path):
    """Only appendix B writes HTML, CSS or JavaScript; a lesson calls `show_attention`/`show_perplexity`."""
    for _, src in _code_cells(path):
        assert not re.search(r"<(script|style)\b", src), f"{path.name} carries HTML/JS code: move it to appendix B"
        assert not re.search(r"from llm_from_scratch\.widgets import[^\n]*\b_\w", src), \
            f"{path.name} imports private widget plumbing; use the public functions"


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_saved_live_widgets_are_kept_out_of_the_book(path):
    """A saved ipywidget with controls looks live on a static page but does nothing: the cell that displays a
    live explorer must carry the `remove-output` tag (progress bars, which only display, may stay)."""
    for cell, src in _code_cells(path):
        views = [o for o in cell.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        if views and re.search(r"\b(attention_explorer|perplexity_explorer|AttentionExplorer)\(", src):
            tags = cell["metadata"].get("tags", [])
            assert "remove-output" in tags or "remove-cell" in tags, \
                f"{path.name}: a cell shows a live explorer without the remove-output tag:\n{src[:200]}"


def test_live_explorers_fall_back_to_static_without_ipywidgets(monkeypatch, capsys):
    """A plain install has no ipywidgets: the lesson's call prints one line and shows the static explorer."""
    from llm_from_scratch import widgets
    monkeypatch.setitem(sys.modules, "ipywidgets", None)          # `import ipywidgets` now raises ImportError
    assert not widgets.have_ipywidgets()
    with pytest.raises(ImportError, match="pip install ipywidgets"):
        AttentionExplorer(lambda text: (text.split(), torch.ones(1, 1)), text="a")
    weights_fn = lambda text: (text.split(), torch.tril(torch.ones(3, 3)) / torch.arange(1, 4)[:, None])
    shown = widgets.attention_explorer(weights_fn, text="a b c", title="fallback")
    assert "needs ipywidgets" in capsys.readouterr().out
    assert 'class="lfs-attn"' in shown.data and "fallback" in shown.data
    shown = widgets.perplexity_explorer(_tiny_model(), _Tok(), "hello there")
    assert "needs ipywidgets" in capsys.readouterr().out and "ppx-tok" in shown.data
