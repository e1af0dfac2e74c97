"""Part 27's KV cache under bad input: every refusal names the problem and the fix, and a decoder reused for
another sequence never builds on the wrong keys (it rewinds and gives the uncached model's logits)."""
import pytest
import torch

from llm_from_scratch.generate import generate
from llm_from_scratch.kv_cache import CachedDecoder, KVCache, KVCacheError, cached_forward

CFG = {"vocab_size": 97, "context_length": 10, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.1, "qkv_bias": False}


def _model(seed=0, cfg=CFG):
    from llm_from_scratch.model import GPTModel
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def _ids(b, t, seed):
    return torch.randint(0, CFG["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def _uncached(model, idx, ctx=CFG["context_length"]):
    with torch.no_grad():
        return model(idx[:, -ctx:])[:, -1]


# --- reuse: a second prompt, an edited history, the same sequence again ------------------------------------

def _decode(dec, idx, n):
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, dec(idx).argmax(-1, keepdim=True)], dim=1)
    return idx


def test_reused_decoder_for_a_second_prompt_rewinds_and_matches_the_uncached_model():
    model = _model(1)
    dec = CachedDecoder(model, 10, batch_size=2, max_len=10)
    _decode(dec, _ids(2, 3, 0), 4)                                        # 4 steps on 3..6 tokens: 6 cached
    assert dec.cache.length == 6 and dec.rewinds == 0
    second = _ids(2, 5, 1)                                                # another prompt, same batch size
    with torch.no_grad():
        got = dec(second)
    torch.testing.assert_close(got, _uncached(model, second), rtol=1e-5, atol=1e-5)
    assert dec.rewinds == 1 and dec.cache.length == 5
    # and continuing the second prompt stays exact, token by token, as generate without a cache gives
    out = _decode(dec, second, 5)                                         # goes past the window of 10 as well
    assert torch.equal(out, generate(model, second, 5, 10, use_cache=False))


def test_reuse_with_a_longer_unrelated_prompt_is_not_built_on_the_old_cache():
    # the bug of issue 16: a longer second prompt used to be fed from position cache.length on
    model = _model(2)
    dec = CachedDecoder(model, 10, batch_size=1, max_len=10)
    _decode(dec, _ids(1, 2, 3), 2)                                        # 4 tokens cached
    second = _ids(1, 8, 4)
    assert not torch.equal(second[:, :4], dec.tokens[:, :4])
    with torch.no_grad():
        got = dec(second)
    torch.testing.assert_close(got, _uncached(model, second), rtol=1e-5, atol=1e-5)
    assert dec.rewinds == 1


def test_edited_history_keeps_only_the_common_prefix():
    model = _model(3)
    dec = CachedDecoder(model, 10, batch_size=2, max_len=10)
    seq = _ids(2, 8, 5)
    with torch.no_grad():
        dec(seq)                                                          # prefill 8
    edited = seq.clone()
    edited[1, 5] = (edited[1, 5] + 1) % CFG["vocab_size"]                 # row 1 differs from position 5 on
    edited = torch.cat([edited, _ids(2, 1, 6)], dim=1)
    with torch.no_grad():
        got = dec(edited)
    torch.testing.assert_close(got, _uncached(model, edited), rtol=1e-5, atol=1e-5)
    assert dec.rewinds == 1 and dec.cache.length == 9
    assert torch.equal(dec.tokens[:, :9], edited)


def test_the_same_sequence_twice_gives_the_same_logits():
    model = _model(4)
    dec = CachedDecoder(model, 10, batch_size=1, max_len=10)
    seq = _ids(1, 6, 7)
    with torch.no_grad():
        a, b = dec(seq), dec(seq)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert dec.rewinds == 1 and dec.cache.length == 6


def test_reset_starts_again_and_counters_restart():
    model = _model(5)
    dec = CachedDecoder(model, 10, batch_size=1, max_len=10)
    _decode(dec, _ids(1, 3, 8), 3)
    dec.reset()
    assert dec.cache.length == 0 and dec.cached_steps == dec.window_steps == dec.rewinds == 0
    seq = _ids(1, 4, 9)
    with torch.no_grad():
        torch.testing.assert_close(dec(seq), _uncached(model, seq), rtol=1e-5, atol=1e-5)
    assert dec.rewinds == 0


# --- wrong batch -------------------------------------------------------------------------------------------

def test_decoder_called_with_another_batch_size_names_the_size_to_use():
    model = _model(6)
    dec = CachedDecoder(model, 10, batch_size=3, max_len=10)
    with pytest.raises(KVCacheError) as e:
        dec(_ids(2, 4, 0))
    msg = str(e.value)
    assert "made for a batch of 3 sequences, called with 2" in msg            # the problem
    assert "CachedDecoder(model, context_size, batch_size=2" in msg           # the fix
    assert dec.cache.length == 0                                              # nothing was written


def test_cached_forward_with_a_cache_of_another_batch_size_refuses_instead_of_broadcasting():
    model = _model(7)
    cache = KVCache.for_model(model, batch_size=2)
    with pytest.raises(KVCacheError) as e:
        cached_forward(model, _ids(1, 3, 1), cache)
    assert "idx holds 1 sequences but the cache was made for a batch of 2" in str(e.value)
    assert "KVCache.for_model(model, batch_size=1)" in str(e.value)
    assert cache.length == 0


def test_update_with_keys_of_another_batch_refuses_instead_of_broadcasting():
    cache = KVCache(n_layers=1, batch_size=2, n_heads=3, head_dim=4, capacity=5)
    k = torch.randn(1, 3, 2, 4)                                               # batch 1 would broadcast into 2 rows
    with pytest.raises(KVCacheError) as e:
        cache.update(0, k, k)
    assert "k has shape (1, 3, 2, 4)" in str(e.value) and "batch=2" in str(e.value)
    assert "KVCache.for_model(model, batch_size=...)" in str(e.value)
    with pytest.raises(KVCacheError, match="k has 2 new tokens but v has 1"):
        cache.update(0, torch.randn(2, 3, 2, 4), torch.randn(2, 3, 1, 4))
    with pytest.raises(KVCacheError, match="layer=1, but this cache holds layers 0 to 0"):
        cache.update(1, torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))


def test_cache_of_another_model_or_dtype_is_refused():
    model = _model(8)
    other = _model(8, {**CFG, "n_layers": 3})
    with pytest.raises(KVCacheError) as e:
        cached_forward(model, _ids(1, 2, 0), KVCache.for_model(other, 1))
    assert "made for another model (3 layers, 2 heads of 8) than this one (2 layers" in str(e.value)
    assert "KVCache.for_model(model, batch_size)" in str(e.value)
    cache = KVCache.for_model(model, 1)
    model_bf16 = _model(8).to(torch.bfloat16)
    with pytest.raises(KVCacheError) as e:
        cached_forward(model_bf16, _ids(1, 2, 0), cache)
    assert "the cache is torch.float32" in str(e.value) and "torch.bfloat16" in str(e.value)
    assert "make the cache after moving or converting the model" in str(e.value)


# --- beyond the context ------------------------------------------------------------------------------------

def test_capacity_beyond_the_context_names_the_limit():
    model = _model(9)
    with pytest.raises(KVCacheError) as e:
        KVCache.for_model(model, 1, capacity=11)
    assert "capacity=11 exceeds the model's context_length 10" in str(e.value)
    assert "pass capacity <= 10, or leave it None" in str(e.value)


def test_cached_forward_past_the_capacity_says_what_to_do():
    model = _model(10)
    cache = KVCache.for_model(model, 1)
    cached_forward(model, _ids(1, 8, 0), cache)
    with pytest.raises(KVCacheError) as e:
        cached_forward(model, _ids(1, 3, 1), cache)
    assert "8 cached + 3 new tokens exceed the cache capacity 10" in str(e.value)
    assert "start a new cache, or decode with CachedDecoder" in str(e.value)
    assert cache.length == 8                                                  # the cached tokens are kept


def test_context_size_beyond_the_model_fails_when_the_window_would_overflow():
    model = _model(11)
    dec = CachedDecoder(model, 50, batch_size=1, max_len=30)
    out = _decode(dec, _ids(1, 2, 0), 8)                                      # 10 tokens: still fits the model
    with pytest.raises(KVCacheError) as e:
        dec(out[:, :10].repeat(1, 2)[:, :11])
    msg = str(e.value)
    assert "the sequence has 11 tokens and context_size=50" in msg and "context_length is 10" in msg
    assert "pass context_size=10 or less" in msg
    with pytest.raises(ValueError, match="context_length is 10"):
        generate(model, _ids(1, 2, 0), 20, 50, use_cache=True)


# --- models that cannot be cached, and bad arguments ------------------------------------------------------

class Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_a_model_that_cannot_be_cached_is_refused_with_the_uncached_path_as_the_fix():
    model = _model(12)
    w = Wrapped(model).eval()
    with pytest.raises(KVCacheError) as e:
        CachedDecoder(w, 10, batch_size=1, max_len=5)
    assert "Wrapped is not the course's GPTModel" in str(e.value)
    assert "generate(..., use_cache=False)" in str(e.value) and "model.eval()" not in str(e.value)
    with pytest.raises(KVCacheError) as e:
        KVCache.for_model(w, 1)
    assert "expected the course's GPTModel, got Wrapped" in str(e.value) and "use_cache=False" in str(e.value)
    with pytest.raises(KVCacheError) as e:
        cached_forward(w, _ids(1, 2, 0), KVCache.for_model(model, 1))
    assert "not the course's GPTModel" in str(e.value)


def test_training_mode_is_refused_with_eval_as_the_fix():
    model = _model(13).train()
    with pytest.raises(KVCacheError) as e:
        CachedDecoder(model, 10, batch_size=1, max_len=5)
    assert "training mode" in str(e.value) and "call model.eval() first" in str(e.value)
    dec = CachedDecoder(model.eval(), 10, batch_size=1, max_len=5)
    model.train()                                                             # switched after the decoder was made
    with pytest.raises(KVCacheError, match="call model.eval"):
        dec(_ids(1, 2, 0))


@pytest.mark.parametrize("kw,name", [({"context_size": 0}, "context_size"), ({"batch_size": 0}, "batch_size"),
                                     ({"max_len": -1}, "max_len"), ({"batch_size": True}, "batch_size")])
def test_decoder_arguments_are_checked(kw, name):
    args = {"context_size": 10, "batch_size": 1, "max_len": 5, **kw}
    with pytest.raises(ValueError, match=f"CachedDecoder: {name}=.* must be a positive int"):
        CachedDecoder(_model(14), **args)


def test_decoder_input_that_is_not_a_2d_tensor_says_how_to_shape_it():
    dec = CachedDecoder(_model(15), 10, batch_size=1, max_len=5)
    with pytest.raises(TypeError, match=r"got \(4,\); for one sequence use ids.unsqueeze\(0\)"):
        dec(torch.tensor([1, 2, 3, 4]))
    with pytest.raises(TypeError, match="got list"):
        dec([[1, 2]])
    with pytest.raises(ValueError, match="token ids must lie in"):
        dec(torch.tensor([[1, 200]]))
    assert dec.cache.length == 0
