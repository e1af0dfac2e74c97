"""Input validation of the attention explorer (llm_from_scratch.widgets, part 5)."""
import numpy as np
import pytest
import torch

from llm_from_scratch.widgets import AttentionExplorer, attention_explorer_html, attention_weights_4d

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
