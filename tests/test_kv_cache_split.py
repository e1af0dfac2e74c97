"""Part 27's `_decode_linear`: the row-split matrix product of a decoding step equals the layer's own product (up to
float32 rounding) in every shape it takes over, leaves every other case to the layer itself, and cached decoding
through it still gives the uncached model's tokens; where the split is used is decided by a timing kept per shape
(`_split_wins`), which these tests either force (`_SPLIT_MODE`) or feed. Speed is measured by
benchmarks/bench_generate.py, never here."""
import pytest
import torch
from torch import nn

import llm_from_scratch.kv_cache as kv
from llm_from_scratch.generate import generate
from llm_from_scratch.kv_cache import KVCache, cached_forward
from llm_from_scratch.model import GPTModel

TOL = {"rtol": 1e-5, "atol": 1e-5}        # float32, same products added in another order


def _linear(out_f, in_f, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    assert layer.weight.numel() >= kv._SPLIT_MIN_WEIGHTS, "the test layer must be large enough to be split"
    return layer


@pytest.fixture
def spy(monkeypatch):
    "Count the batched products `_decode_linear` issues, to know that the split path ran (forced on: the timing may refuse it)."
    monkeypatch.setattr(kv, "_SPLIT_MODE", True)
    calls = []
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("out_f", [512, 1001])                      # 1001: rows left over after the equal blocks
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 4), (2, 4), (8, 1), ()])   # leading dims of x
def test_split_equals_the_layer(out_f, bias, shape, spy):
    layer = _linear(out_f, 300, bias)
    x = torch.randn(*shape, 300)
    with torch.no_grad():
        got, want = kv._decode_linear(layer, x), layer(x)
    assert got.shape == want.shape == (*shape, out_f)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL)
    assert spy, "the split path did not run"


@pytest.mark.parametrize("threads", [1, 3])                          # k = max(2, threads): 3 leaves 1001 % 3 rows
def test_block_count_follows_the_threads(threads, spy):
    layer, x = _linear(1001, 300), torch.randn(2, 1, 300)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
    finally:
        torch.set_num_threads(before)


def test_other_cases_are_the_layer_itself(spy):
    layer = _linear(512, 300)
    with torch.no_grad():
        many_rows = torch.randn(1, kv._SPLIT_MAX_ROWS + 1, 300)            # a long prefill
        assert torch.equal(kv._decode_linear(layer, many_rows), layer(many_rows))
        small = nn.Linear(16, 8)                                             # below _SPLIT_MIN_WEIGHTS
        xs = torch.randn(1, 1, 16)
        assert torch.equal(kv._decode_linear(small, xs), small(xs))
        half = _linear(512, 300).to(torch.bfloat16)
        xh = torch.randn(1, 1, 300, dtype=torch.bfloat16)
        assert torch.equal(kv._decode_linear(half, xh), half(xh))

        class Doubled(nn.Linear):                                            # a replaced layer keeps its forward
            def forward(self, x):
                return 2 * super().forward(x)
        doubled = Doubled(300, 512)
        x = torch.randn(1, 1, 300)
        assert torch.equal(kv._decode_linear(doubled, x), doubled(x))
    assert not spy, "a case that should have used the layer's own call was split"
    with pytest.raises(RuntimeError):                                        # a wrong width fails as the layer does
        kv._decode_linear(layer, torch.randn(1, 1, 299))


CFG = {"vocab_size": 1001, "context_length": 40, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": True}


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decoding_through_the_split_gives_the_uncached_tokens(batch, monkeypatch, spy):
    monkeypatch.setattr(kv, "_SPLIT_MIN_WEIGHTS", 0)                       # split every layer of this small model
    torch.manual_seed(batch)
    model = GPTModel(CFG).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(4)                                        # peaked: sampling differs from argmax
    idx = torch.randint(0, CFG["vocab_size"], (batch, 5), generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"temperature": 0.9, "top_k": 50}):
        a, b = (generate(model, idx, 50, CFG["context_length"], use_cache=c,
                         generator=torch.Generator().manual_seed(1), **kw) for c in (True, False))
        assert torch.equal(a, b), kw                                         # 50 tokens: past the window of 40
    assert spy
    cache = KVCache.for_model(model, batch)
    ids = torch.randint(0, CFG["vocab_size"], (batch, 12), generator=torch.Generator().manual_seed(2))
    steps = torch.cat([cached_forward(model, ids[:, :4], cache, last_only=False)]
                      + [cached_forward(model, ids[:, t:t + 1], cache) for t in range(4, 12)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(steps, model(ids), **TOL)


@pytest.mark.parametrize("where", ["ff", "linear", "out_head"])
def test_hooks_and_replaced_forwards_still_run(where, monkeypatch):
    monkeypatch.setattr(kv, "_SPLIT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(kv, "_SPLIT_MODE", True)
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    block = model.trf_blocks[0]
    mod = {"ff": block.ff, "linear": block.ff.layers[0], "out_head": model.out_head}[where]
    idx = torch.tensor([[1, 2, 3]])
    seen = []
    handle = mod.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    generate(model, idx, 2, CFG["context_length"], use_cache=True)
    assert len(seen) == 2, seen                       # the prefill and one cached step both called the module
    handle.remove()
    plain = generate(model, idx, 4, CFG["context_length"], use_cache=False)
    mod.forward = lambda x, _f=mod.forward: _f(x).roll(1, -1) * 20  # replaced on the instance: must be used
    with torch.no_grad():
        a = generate(model, idx, 4, CFG["context_length"], use_cache=True)
        b = generate(model, idx, 4, CFG["context_length"], use_cache=False)
    assert torch.equal(a, b) and not torch.equal(b, plain)      # the replacement changed the tokens, in both


def test_the_block_views_follow_the_layers_weights(spy):
    """`_split_plan` keeps each layer's block views between calls; they must never serve stale weights: an in-place
    change shows through the views, a new weight or bias tensor, new memory (`.to`) or another thread count makes
    new views, and a layer that is gone leaves no plan behind."""
    layer = _linear(300, 256)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
        first = kv._SPLIT_PLANS[layer]
        kv._decode_linear(layer, x)
        assert kv._SPLIT_PLANS[layer] is first                   # reused, not rebuilt
        layer.weight.mul_(2.0)                                   # in place, as an optimizer step
        layer.bias.add_(1.0)
        torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
        assert kv._SPLIT_PLANS[layer] is first
        layer.weight = nn.Parameter(torch.randn(300, 256))       # a new tensor
        torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
        layer.bias = None
        torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
        layer.weight.data = layer.weight.data.clone()            # the same Parameter, new memory
        torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(3)                             # 300 rows: 3 blocks of 100
            torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
            assert kv._SPLIT_PLANS[layer][2] == 3
        finally:
            torch.set_num_threads(threads)
    assert len(spy) == 7                                         # every call above took the split path
    n_plans = len(kv._SPLIT_PLANS)
    del layer, first
    import gc
    gc.collect()
    assert len(kv._SPLIT_PLANS) == n_plans - 1


def test_the_split_is_used_only_where_it_timed_faster(monkeypatch):
    """With `_SPLIT_MODE=None` the first call of a shape times both ways and keeps both times; later calls follow
    the faster one without timing again, per shape (rows, threads and bias are part of the shape); `False` never
    splits. Both ways give the layer's product."""
    monkeypatch.setattr(kv, "_SPLIT_MODE", None)
    monkeypatch.setattr(kv, "_SPLIT_TIMINGS", {})
    calls = []
    real_bmm, real_baddbmm = torch.bmm, torch.baddbmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real_bmm(*a, **k))
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: calls.append(1) or real_baddbmm(*a, **k))
    layer, x = _linear(512, 300), torch.randn(1, 1, 300)
    key = (512, 300, 1, max(2, torch.get_num_threads()), True)
    with torch.no_grad():
        torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
        split_s, plain_s = kv._SPLIT_TIMINGS[key]                     # measured on first use
        assert 0 < split_s < 1 and 0 < plain_s < 1
        assert len(calls) == 6 + (split_s < plain_s)                  # 6 timed splits, then the call itself
        for split_wins in (True, False):                              # feed the outcome, check it is followed
            kv._SPLIT_TIMINGS[key] = (1.0, 2.0) if split_wins else (2.0, 1.0)
            calls.clear()
            torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
            assert len(calls) == split_wins, split_wins
        kv._decode_linear(layer, torch.randn(3, 1, 300))              # 3 rows: another shape, timed on its own
        assert (512, 300, 3, key[3], True) in kv._SPLIT_TIMINGS and len(kv._SPLIT_TIMINGS) == 2
        kv._SPLIT_TIMINGS[key] = (1.0, 2.0)
        monkeypatch.setattr(kv, "_SPLIT_MODE", False)
        calls.clear()
        torch.testing.assert_close(kv._decode_linear(layer, x), layer(x), **TOL)
        assert not calls                                              # never, whatever the timings say
