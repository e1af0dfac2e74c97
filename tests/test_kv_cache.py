"""Part 27's KV cache: cached decoding gives the uncached path's tokens exactly (greedy and sampled, batches,
eos, past the context length), cached logits equal a full forward pass, and bad input fails clearly."""
import pytest
import torch

from llm_from_scratch.generate import generate
from llm_from_scratch.kv_cache import CachedDecoder, KVCache, KVCacheError, cached_forward, supports_kv_cache
from llm_from_scratch.model import GPTModel, generate_text_simple

CFG = {"vocab_size": 101, "context_length": 12, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.1, "qkv_bias": True}


def _model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    m = GPTModel(cfg).eval()
    with torch.no_grad():
        m.out_head.weight.mul_(4)            # peaked enough that sampling and argmax differ visibly
    return m


def _both(model, idx, n, ctx, seed=123, **kw):
    """generate with and without the cache, each with its own generator seeded alike."""
    return [generate(model, idx, n, ctx, generator=torch.Generator().manual_seed(seed), use_cache=use_cache, **kw)
            for use_cache in (True, False)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prompt_len", [1, 5, CFG["context_length"]])
def test_greedy_cached_equals_uncached_and_the_book(seed, prompt_len):
    model = _model(seed)
    idx = torch.randint(0, CFG["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    ctx = CFG["context_length"]
    cached, plain = _both(model, idx, 20, ctx)        # 20 new tokens: well past the window of 12
    assert cached.shape == (1, prompt_len + 20)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, generate_text_simple(model, idx, 20, ctx))


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5), (2.0, 20)])
def test_sampling_makes_the_same_draws_in_the_same_order(temperature, top_k):
    model = _model(3)
    idx = torch.tensor([[5, 6, 7], [9, 9, 9], [1, 50, 100]])        # batch of 3
    for seed in (0, 7):
        a, b = _both(model, idx, 15, CFG["context_length"], temperature=temperature, top_k=top_k, seed=seed)
        assert torch.equal(a, b)
        torch.manual_seed(seed)                                       # the global RNG path too
        c = generate(model, idx, 15, CFG["context_length"], temperature=temperature, top_k=top_k, use_cache=True)
        torch.manual_seed(seed)
        d = generate(model, idx, 15, CFG["context_length"], temperature=temperature, top_k=top_k, use_cache=False)
        assert torch.equal(c, d)


def test_batch_and_eos_match():
    model = _model(4)
    idx = torch.tensor([[1, 2, 3], [40, 50, 60]])
    ctx = CFG["context_length"]
    greedy = generate(model, idx, 8, ctx, use_cache=False)
    for eos in (greedy[0, 3].item(), greedy[1, 5].item(), greedy[0, 6].item()):
        a = generate(model, idx, 8, ctx, eos_id=eos, use_cache=True)
        b = generate(model, idx, 8, ctx, eos_id=eos, use_cache=False)
        assert torch.equal(a, b)


def test_smaller_context_size_than_the_model_and_cropped_prompt():
    model = _model(5)
    idx = torch.randint(0, CFG["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(0))
    for ctx in (4, 6, 12):                                 # 4: the prompt fills the window at once
        a, b = _both(model, idx, 10, ctx)
        assert torch.equal(a, b)
    long = torch.randint(0, CFG["vocab_size"], (1, 15), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning):
        a = generate(model, long, 5, 12, use_cache=True)
    with pytest.warns(UserWarning):
        b = generate(model, long, 5, 12, use_cache=False)
    assert torch.equal(a, b)


def test_cache_full_falls_back_to_recomputing_the_window():
    model = _model(6)
    ctx = CFG["context_length"]
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    dec = CachedDecoder(model, ctx, batch_size=1, max_len=5 + 20)
    x = idx
    with torch.no_grad():
        for _ in range(20):
            x = torch.cat([x, dec(x).argmax(-1, keepdim=True)], dim=1)
    assert dec.cache.capacity == ctx and dec.cache.length == ctx
    assert dec.cached_steps == ctx - 5 + 1               # prefill, then single tokens until the window is full
    assert dec.window_steps == 20 - dec.cached_steps     # the rest recompute the last ctx tokens
    assert torch.equal(x, generate(model, idx, 20, ctx, use_cache=False))


def test_context_size_beyond_the_model_fails_as_the_uncached_path_does():
    model = _model(7)
    idx = torch.tensor([[1, 2]])
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="context_length is 12"):
            generate(model, idx, 20, 50, use_cache=use_cache)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 5], [12], [3, 9]])
def test_cached_logits_equal_full_forward_at_every_position(chunks):
    model = _model(8)
    ids = torch.randint(0, CFG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)                                                         # (B, T, V)
    cache = KVCache.for_model(model, batch_size=2)
    parts, start = [], 0
    for n in chunks:
        parts.append(cached_forward(model, ids[:, start:start + n], cache, last_only=False))
        start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12
    cache2 = KVCache.for_model(model, batch_size=2)
    last = cached_forward(model, ids, cache2)                                     # (B, 1, V)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_cache_shapes_and_memory():
    model = _model()
    cache = KVCache.for_model(model, batch_size=3)
    assert cache.keys[0].shape == (3, 2, 12, 8)                                  # (B, n_heads, T, head_dim)
    assert len(cache.keys) == len(cache.values) == 2
    assert cache.nbytes() == 2 * 2 * 12 * 16 * 4 * 3                              # 2 x layers x T x emb x 4 B x batch


def test_train_mode_is_refused_or_falls_back_as_documented():
    model = _model(9)
    model.train()
    idx = torch.tensor([[1, 2, 3]])
    assert "training mode" in supports_kv_cache(model)
    with pytest.raises(KVCacheError, match="call model.eval()"):
        generate(model, idx, 3, 12, use_cache=True)
    with pytest.raises(KVCacheError, match="call model.eval()"):
        cached_forward(model, idx, KVCache.for_model(model, 1))
    torch.manual_seed(0)
    auto = generate(model, idx, 3, 12)                         # use_cache=None: the plain loop, dropout and all
    torch.manual_seed(0)
    plain = generate(model, idx, 3, 12, use_cache=False)
    assert torch.equal(auto, plain)


def test_other_modules_fall_back_and_bad_arguments_fail():
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = _model(10)
    w = Wrapped(model).eval()
    idx = torch.tensor([[1, 2, 3]])
    assert supports_kv_cache(w) is not None
    assert torch.equal(generate(w, idx, 5, 12), generate(model, idx, 5, 12))
    with pytest.raises(KVCacheError, match="not the course's GPTModel"):
        generate(w, idx, 5, 12, use_cache=True)
    with pytest.raises(TypeError, match="use_cache must be True, False or None"):
        generate(model, idx, 5, 12, use_cache="yes")
    with pytest.raises(KVCacheError, match="capacity"):
        KVCache.for_model(model, 1, capacity=13)
    cache = KVCache.for_model(model, 1, capacity=4)
    cached_forward(model, torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(KVCacheError, match="exceed the cache capacity 4"):
        cached_forward(model, torch.tensor([[1, 2]]), cache)
    with pytest.raises(ValueError, match="must be a positive int"):
        KVCache(0, 1, 1, 1, 1)


def test_max_new_tokens_zero_and_default_is_cached():
    model = _model(11)
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, idx, 0, 12), idx)
    assert supports_kv_cache(model) is None
