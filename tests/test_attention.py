"""Tests for llm_from_scratch.attention (part 12): multi-head attention, wrapper and weight-split versions."""
import pytest
import torch

from llm_from_scratch.attention import MultiHeadAttention, MultiHeadAttentionWrapper
from llm_from_scratch.causal_attention import CausalAttention

BOOK_KEYS = {"W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight", "out_proj.bias", "mask"}
SHAPES = [  # (B, T, context_length, d_in, d_out, num_heads)
    (1, 1, 4, 4, 4, 1), (2, 6, 6, 3, 4, 2), (3, 9, 16, 16, 12, 3), (2, 32, 32, 64, 64, 8), (1, 50, 64, 24, 48, 6)]


def mha_from_wrapper(wrapper, context_length):
    heads = wrapper.heads
    d_head, d_in = heads[0].W_query.weight.shape
    qkv_bias = heads[0].W_query.bias is not None
    mha = MultiHeadAttention(d_in, len(heads) * d_head, context_length, 0.0, len(heads), qkv_bias=qkv_bias)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            big = getattr(mha, name)
            big.weight.copy_(torch.cat([getattr(h, name).weight for h in heads], dim=0))
            if qkv_bias:
                big.bias.copy_(torch.cat([getattr(h, name).bias for h in heads], dim=0))
        mha.out_proj.weight.copy_(torch.eye(mha.d_out))
        mha.out_proj.bias.zero_()
    return mha


def test_attributes_and_shapes():
    m = MultiHeadAttention(d_in=10, d_out=12, context_length=8, dropout=0.1, num_heads=3)
    assert (m.d_out, m.num_heads, m.head_dim) == (12, 3, 4)
    assert m.use_sdpa is False
    for name in ("W_query", "W_key", "W_value"):
        lin = getattr(m, name)
        assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (12, 10) and lin.bias is None
    assert m.out_proj.weight.shape == (12, 12) and m.out_proj.bias is not None
    assert m.dropout.p == 0.1
    torch.testing.assert_close(m.mask, torch.triu(torch.ones(8, 8), diagonal=1))
    assert m(torch.randn(2, 5, 10)).shape == (2, 5, 12)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_state_dict_keys_match_book(qkv_bias):
    m = MultiHeadAttention(6, 6, 4, 0.0, 2, qkv_bias=qkv_bias)
    extra = {"W_query.bias", "W_key.bias", "W_value.bias"} if qkv_bias else set()
    assert set(m.state_dict()) == BOOK_KEYS | extra
    fast = MultiHeadAttention(6, 6, 4, 0.0, 2, qkv_bias=qkv_bias, use_sdpa=True)
    fast.load_state_dict(m.state_dict())  # strict: the two paths share one checkpoint format


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_equals_explicit_in_eval(shape, qkv_bias):
    B, T, ctx, d_in, d_out, h = shape
    torch.manual_seed(0)
    m = MultiHeadAttention(d_in, d_out, ctx, 0.2, h, qkv_bias=qkv_bias).eval()
    x = torch.randn(B, T, d_in, requires_grad=True)
    m.use_sdpa = False
    slow = m(x); (g_slow,) = torch.autograd.grad(slow.square().sum(), x)
    m.use_sdpa = True
    fast = m(x); (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("B,T,d_in,d_head,h", [(2, 6, 3, 2, 2), (1, 1, 5, 4, 3), (4, 10, 8, 2, 4), (3, 7, 16, 8, 1)])
def test_wrapper_equals_weight_split(B, T, d_in, d_head, h, qkv_bias):
    torch.manual_seed(1)
    w = MultiHeadAttentionWrapper(d_in, d_head, T, 0.0, h, qkv_bias=qkv_bias).eval()
    assert len(w.heads) == h and all(isinstance(head, CausalAttention) for head in w.heads)
    x = torch.randn(B, T, d_in)
    out = w(x)
    assert out.shape == (B, T, h * d_head)
    for i, head in enumerate(w.heads):
        torch.testing.assert_close(out[..., i * d_head:(i + 1) * d_head], head(x), atol=0, rtol=0)
    for use_sdpa in (False, True):
        m = mha_from_wrapper(w, T).eval()
        m.use_sdpa = use_sdpa
        torch.testing.assert_close(m(x), out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_causality(use_sdpa):
    torch.manual_seed(2)
    m = MultiHeadAttention(8, 8, 12, 0.0, 4, use_sdpa=use_sdpa).eval()
    x = torch.randn(2, 12, 8)
    base = m(x)
    for k in range(12):
        y = x.clone()
        y[:, k] = torch.randn(2, 8) * 10
        out = m(y)
        torch.testing.assert_close(out[:, :k], base[:, :k], atol=1e-6, rtol=0)  # earlier positions untouched
        assert not torch.allclose(out[:, k], base[:, k])


def test_attention_weights():
    torch.manual_seed(3)
    m = MultiHeadAttention(8, 8, 10, 0.0, 2).eval()
    x = torch.randn(3, 7, 8)
    out, w = m(x, return_attn_weights=True)
    assert w.shape == (3, 2, 7, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 7), atol=1e-6, rtol=0)
    assert torch.all(w.triu(diagonal=1) == 0)
    torch.testing.assert_close(out, m(x), atol=0, rtol=0)
    m.use_sdpa = True  # the fast path cannot give weights: it falls back to the explicit path
    out2, w2 = m(x, return_attn_weights=True)
    torch.testing.assert_close(w2, w, atol=0, rtol=0)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_dropout_train_vs_eval(use_sdpa):
    torch.manual_seed(4)
    m = MultiHeadAttention(16, 16, 20, 0.5, 4, use_sdpa=use_sdpa)
    x = torch.randn(2, 20, 16)
    m.train()
    a, b = m(x), m(x)
    assert not torch.allclose(a, b)  # different dropout masks
    m.eval()
    e1, e2 = m(x), m(x)
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)  # deterministic
    assert not torch.allclose(a, e1)
    m0 = MultiHeadAttention(16, 16, 20, 0.0, 4, use_sdpa=use_sdpa)
    m0.load_state_dict(m.state_dict())
    torch.testing.assert_close(m0.train()(x), e1, atol=1e-6, rtol=0)  # p=0: train == eval


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(d_out=770, num_heads=12), ValueError, "d_out=770 is not divisible by num_heads=12"),
    (dict(dropout=1.0), ValueError, "dropout=1.0 must be a probability in [0, 1)"),
    (dict(dropout=-0.1), ValueError, "must be a probability"),
    (dict(context_length=0), ValueError, "context_length=0 must be a positive int"),
    (dict(num_heads=0), ValueError, "num_heads=0 must be a positive int"),
])
def test_bad_construction(kwargs, exc, msg):
    args = dict(d_in=768, d_out=768, context_length=16, dropout=0.1, num_heads=12) | kwargs
    with pytest.raises(exc) as e:
        MultiHeadAttention(**args)
    assert msg in str(e.value)


@pytest.mark.parametrize("x,exc,msg", [
    (torch.randn(5, 8), ValueError, "x.unsqueeze(0)"),
    (torch.randn(1, 1, 5, 8), ValueError, "expected a 3-d input"),
    (torch.randn(1, 5, 7), ValueError, "last dimension is 7 but the module was built with d_in=8"),
    (torch.randn(1, 20, 8), ValueError, "20 tokens but context_length is 16"),
    ([[1.0] * 8], TypeError, "expected a torch.Tensor"),
])
@pytest.mark.parametrize("use_sdpa", [False, True])
def test_bad_input(x, exc, msg, use_sdpa):
    m = MultiHeadAttention(8, 8, 16, 0.0, 2, use_sdpa=use_sdpa)
    with pytest.raises(exc) as e:
        m(x)
    assert msg in str(e.value)


def test_wrapper_bad_num_heads():
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttentionWrapper(4, 4, 8, 0.0, num_heads=0)
