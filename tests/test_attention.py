"""Tests for the attention modules: self-attention (part 8), causal attention (parts 9-10) and multi-head
attention (part 12, wrapper and weight-split versions). Golden values are the ones the book prints in chapter 3
for the same inputs and seeds."""
import pytest
import torch

from llm_from_scratch.attention import MultiHeadAttention, MultiHeadAttentionWrapper
from llm_from_scratch.causal_attention import CausalAttention, causal_attention_weights
from llm_from_scratch.self_attention import SelfAttention_v1, SelfAttention_v2, load_v2_into_v1

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


# --- parts 8 and 9: the book's six-token example and the values the book prints for it ---
BOOK_INPUTS = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                            [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])


def test_self_attention_v1_book_values():
    torch.manual_seed(123)
    out = SelfAttention_v1(3, 2)(BOOK_INPUTS)
    book = torch.tensor([[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203],
                         [0.2948, 0.7939], [0.2927, 0.7891], [0.2990, 0.8040]])   # section 3.4.2
    torch.testing.assert_close(out, book, atol=1e-4, rtol=0)


def test_self_attention_v2_book_values_and_v1_equivalence():
    torch.manual_seed(789)
    v2 = SelfAttention_v2(3, 2)
    book = torch.tensor([[-0.0739, 0.0713], [-0.0748, 0.0703], [-0.0749, 0.0702],
                         [-0.0760, 0.0685], [-0.0763, 0.0679], [-0.0754, 0.0693]])  # section 3.4.2
    torch.testing.assert_close(v2(BOOK_INPUTS), book, atol=1e-4, rtol=0)
    v1 = load_v2_into_v1(SelfAttention_v1(3, 2), v2)
    torch.testing.assert_close(v1(BOOK_INPUTS), v2(BOOK_INPUTS), atol=1e-6, rtol=0)


def test_causal_weights_book_values():
    torch.manual_seed(789)
    sa = SelfAttention_v2(3, 2)
    with torch.no_grad():
        w = causal_attention_weights(sa.W_query(BOOK_INPUTS), sa.W_key(BOOK_INPUTS))
    book = torch.tensor([[1.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000],
                         [0.5517, 0.4483, 0.0000, 0.0000, 0.0000, 0.0000],
                         [0.3800, 0.3097, 0.3103, 0.0000, 0.0000, 0.0000],
                         [0.2758, 0.2460, 0.2462, 0.2319, 0.0000, 0.0000],
                         [0.2175, 0.1983, 0.1984, 0.1888, 0.1971, 0.0000],
                         [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529]])       # section 3.5.1
    torch.testing.assert_close(w, book, atol=1e-4, rtol=0)
    assert torch.all(w.triu(diagonal=1) == 0)


def test_causal_attention_book_values():
    torch.manual_seed(123)
    ca = CausalAttention(3, 2, context_length=6, dropout=0.0)
    out = ca(torch.stack((BOOK_INPUTS, BOOK_INPUTS)))
    book = torch.tensor([[-0.4519, 0.2216], [-0.5874, 0.0058], [-0.6300, -0.0632],
                         [-0.5675, -0.0843], [-0.5526, -0.0981], [-0.5299, -0.1081]])  # section 3.5.3
    assert out.shape == (2, 6, 2)
    torch.testing.assert_close(out[0], book, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], book, atol=1e-4, rtol=0)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_causal_attention_refuses_bad_dropout(p):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        CausalAttention(3, 2, context_length=6, dropout=p)


def test_causal_attention_eval_equals_no_dropout():
    torch.manual_seed(0)
    ca = CausalAttention(8, 4, context_length=10, dropout=0.5)
    x = torch.randn(2, 10, 8)
    assert not torch.equal(ca(x), ca(x))                              # training mode: random
    ref = CausalAttention(8, 4, context_length=10, dropout=0.0)
    ref.load_state_dict(ca.state_dict())
    ca.eval()
    assert torch.equal(ca(x), ref(x))                                 # eval: exactly the p=0 module
