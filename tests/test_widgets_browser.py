"""The static attention and perplexity explorers (llm_from_scratch.widgets, appendix B) in a real browser
(headless Chromium driven by Playwright).

The `browser` fixture (conftest.py) skips, with the reason, only when Chromium or Playwright is missing."""
import pytest
import torch

from llm_from_scratch.widgets import attention_explorer_html


def _page(browser, tmp_path, html):
    f = tmp_path / "explorer.html"
    f.write_text(f"<!doctype html><html><body style='margin:16px'>{html}</body></html>", encoding="utf-8")
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f.as_uri())
    return page, errors


def test_explorer_in_browser(browser, tmp_path):
    tokens = ["the", "cat", "sat", "on", "the", "mat"]
    torch.manual_seed(0)
    w = torch.softmax(3 * torch.randn(2, 3, 6, 6), dim=-1)           # (n_layers, n_heads, T, T)
    html = attention_explorer_html(tokens, w, title="first") + attention_explorer_html(tokens, w[0, 0], title="second")
    page, errors = _page(browser, tmp_path, html)
    first = page.locator(".lfs-attn").nth(0)
    cells = first.locator(".lfs-cell")
    assert cells.count() == 36
    assert page.locator(".lfs-cell").count() == 72                  # two explorers, no id collisions
    before = [c.get_attribute("data-w") for c in cells.all()]
    shown_before = cells.nth(1).inner_text()

    first.locator("select.lfs-head").select_option("2")            # another head
    after = [c.get_attribute("data-w") for c in cells.all()]
    assert after != before
    assert after == [f"{x:.4f}" for x in w[0, 2].flatten().tolist()]
    assert shown_before == f"{w[0, 0, 0, 1].item():.2f}"             # the numbers shown in the cells follow
    assert cells.nth(1).inner_text() == f"{w[0, 2, 0, 1].item():.2f}"
    second_cells = page.locator(".lfs-attn").nth(1).locator(".lfs-cell")
    assert second_cells.nth(1).get_attribute("data-w") == f"{w[0, 0, 0, 1].item():.4f}"   # untouched by the first

    first.locator(".lfs-q").nth(1).hover()                           # query "cat"
    assert "lfs-on" in first.locator(".lfs-q").nth(1).get_attribute("class")
    assert first.locator(".lfs-cell.lfs-dim").count() == 30          # every other row dimmed
    detail = first.locator(".lfs-detail").inner_text()
    assert "cat" in detail and "looks at" in detail and f"{w[0, 2, 1, 1].item():.3f}" in detail

    first.locator(".lfs-k").nth(5).hover()                           # key "mat": who looks at it
    assert first.locator(".lfs-cell.lfs-dim").count() == 30
    assert "Who looks at" in first.locator(".lfs-detail").inner_text()
    page.screenshot(path="/tmp/attention_explorer.png", full_page=True)
    assert errors == []


def _tiny_report():
    """A perplexity report from a small random GPT and the real GPT-2 tokenizer."""
    from llm_from_scratch.widgets import perplexity_report
    from llm_from_scratch.model import GPTModel
    from llm_from_scratch.tokenizer import gpt2_tokenizer
    torch.manual_seed(0)
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(20)          # peaked predictions, so the temperature visibly matters
    return perplexity_report(model, gpt2_tokenizer(), "Every effort moves you forward, said the cat.", top_n=5)


def test_perplexity_explorer_in_browser(browser, tmp_path):
    from llm_from_scratch.widgets import explorer_probabilities, perplexity_explorer_html
    report = _tiny_report()
    page, errors = _page(browser, tmp_path, perplexity_explorer_html(report, title="ppx", temperature=1.0))
    root = page.locator(".lfs-ppx")
    toks = root.locator(".ppx-tok")
    assert toks.count() == len(report["tokens"])

    mean_before = float(root.locator(".ppx-sum").get_attribute("data-mean"))
    assert mean_before == pytest.approx(sum(report["surprisal"]) / len(report["surprisal"]), abs=1e-3)

    toks.nth(3).click()                                              # pin token 3: its bars appear
    fills = lambda: [f.get_attribute("style") for f in root.locator(".ppx-detail .ppx-fill").all()]
    bars_t1 = fills()
    assert len(bars_t1) == 6                                         # top 5 + "all others"
    probs, other, _ = explorer_probabilities(report, 2, report["temperatures"].index(1.0))
    assert root.locator(".ppx-detail .ppx-p").first.inner_text() == f"{probs[0]:.3f}"

    k_hot = len(report["temperatures"]) - 1                          # move the slider to T = 3.0
    root.locator("input.ppx-temp").evaluate(
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(k_hot))
    assert root.locator(".ppx-tval").inner_text() == "3.0"
    bars_t3 = fills()
    assert bars_t3 != bars_t1                                        # the bars change with temperature
    probs3, _, _ = explorer_probabilities(report, 2, k_hot)
    assert root.locator(".ppx-detail .ppx-p").first.inner_text() == f"{probs3[0]:.3f}"
    assert probs3[0] < probs[0]                                      # a hotter softmax is flatter
    assert float(root.locator(".ppx-sum").get_attribute("data-mean")) != pytest.approx(mean_before, abs=1e-3)
    page.screenshot(path="/tmp/perplexity_explorer.png", full_page=True)
    assert errors == []
