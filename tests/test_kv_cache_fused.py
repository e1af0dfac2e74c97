"""Part 27's fused small operations in cached decoding: `F.layer_norm`, `F.gelu(approximate="tanh")` and
`scaled_dot_product_attention` stand in for the course's LayerNorm, GELU and spelled-out attention only where
they compute the same thing. Checked against the explicit path (`_FUSE_SMALL_OPS = False`) and the uncached
model; a replaced or hooked module keeps its own call. Speed is measured in part 27 and the benchmark."""
import pytest
import torch
from torch import nn

import llm_from_scratch.kv_cache as kv
from llm_from_scratch.generate import generate
from llm_from_scratch.kv_cache import KVCache, cached_forward
from llm_from_scratch.layer_norm import LayerNorm
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel

TINY = {**GPT_CONFIG_124M, "vocab_size": 300, "context_length": 24, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0}


def _model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(TINY).eval()


def _logits(model, ids, chunks):
    cache = KVCache.for_model(model, batch_size=ids.shape[0])
    out, at = [], 0
    for n in chunks:
        out.append(cached_forward(model, ids[:, at:at + n], cache, last_only=False))
        at += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 6], [12]])
def test_fused_equals_explicit_and_uncached(monkeypatch, chunks):
    model, ids = _model(), torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    fused = _logits(model, ids, chunks)
    monkeypatch.setattr(kv, "_FUSE_SMALL_OPS", False)
    explicit = _logits(model, ids, chunks)
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)


def test_fused_greedy_tokens_equal_uncached():
    model = _model(3)
    prompt = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, max_new_tokens=15, context_size=24, use_cache=True)
    plain = generate(model, prompt, max_new_tokens=15, context_size=24, use_cache=False)
    assert torch.equal(cached, plain)


def test_fusion_takes_the_course_modules_only(monkeypatch):
    """The fused path is used for the course's LayerNorm and GELU, and skipped for a hooked or replaced one."""
    model, ids = _model(), torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    calls = []
    real_ln = torch.nn.functional.layer_norm
    monkeypatch.setattr(kv.F, "layer_norm", lambda *a, **k: calls.append("ln") or real_ln(*a, **k))
    _logits(model, ids, [6])
    assert calls.count("ln") == 2 * TINY["n_layers"] + 1                 # norm1, norm2 per block, final_norm

    calls.clear()
    seen = []
    model.trf_blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _logits(model, ids, [6])
    assert seen == [torch.Size([1, 6, TINY["emb_dim"]])]                 # the hooked norm ran as a call
    assert calls.count("ln") == 2 * TINY["n_layers"]                    # the others stayed fused

    class MyNorm(LayerNorm):                                            # a subclass may compute something else
        def forward(self, x):
            return super().forward(x) * 2.0
    model2 = _model()
    model2.final_norm = MyNorm(TINY["emb_dim"])
    model2.final_norm.load_state_dict(model.final_norm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_logits(model2, ids, [6]), model2(ids), rtol=1e-5, atol=1e-5)


def test_gelu_replaced_is_called(monkeypatch):
    model, ids = _model(), torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(5))
    model.trf_blocks[1].ff.layers[1] = nn.ReLU()                         # not the course's GELU: must be called
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, ids, [1] * 5), model(ids), rtol=1e-5, atol=1e-5)
