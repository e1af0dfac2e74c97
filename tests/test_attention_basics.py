"""Non-trainable attention (parts 6, 6b, 7): loops == matrix form, rows sum to 1, softmax stability."""
import pytest
import torch

from llm_from_scratch.attention_basics import (attention_scores_for_query, attention_weights_for_query,
                                               attention_weights_loop, context_vector_for_query,
                                               context_vectors_loop, softmax_naive, softmax_stable)
from llm_from_scratch.attention_matrix import simple_attention

# The book's six 3-d embeddings of "Your journey starts with one step".
BOOK_INPUTS = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                            [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])


def _random_inputs(seed, T, d, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d, generator=g, dtype=dtype) * scale


def test_book_golden_values():
    torch.testing.assert_close(attention_scores_for_query(BOOK_INPUTS, BOOK_INPUTS[1]),
                               torch.tensor([0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]), atol=1e-4, rtol=0)
    torch.testing.assert_close(attention_weights_for_query(BOOK_INPUTS, BOOK_INPUTS[1]),
                               torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]), atol=1e-4, rtol=0)
    torch.testing.assert_close(context_vector_for_query(BOOK_INPUTS, 1),
                               torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed,T,d,scale", [(0, 1, 1, 1.0), (1, 6, 3, 1.0), (2, 17, 8, 0.3),
                                            (3, 32, 5, 3.0), (4, 9, 64, 1.0)])
def test_loops_equal_matrix_form(seed, T, d, scale):
    x = _random_inputs(seed, T, d, scale)
    ctx, w = simple_attention(x)
    torch.testing.assert_close(w, attention_weights_loop(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(ctx, context_vectors_loop(x), atol=1e-6, rtol=0)
    for i in range(T):
        torch.testing.assert_close(ctx[i], context_vector_for_query(x, i), atol=1e-6, rtol=0)


def test_float32_book_example_matches_loops():
    ctx, w = simple_attention(BOOK_INPUTS)
    torch.testing.assert_close(w, attention_weights_loop(BOOK_INPUTS), atol=1e-6, rtol=0)
    torch.testing.assert_close(ctx, context_vectors_loop(BOOK_INPUTS), atol=1e-6, rtol=0)


def test_rows_sum_to_one_and_context_is_convex():
    x = _random_inputs(5, 12, 7, scale=2.0)
    for w in (attention_weights_loop(x), simple_attention(x)[1]):
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(dim=-1), torch.ones(12, dtype=x.dtype), atol=1e-6, rtol=0)
    ctx = context_vectors_loop(x)
    assert ((x.min(dim=0).values - 1e-9 <= ctx) & (ctx <= x.max(dim=0).values + 1e-9)).all()


def test_batched_equals_per_example():
    xb = torch.stack([_random_inputs(s, 10, 4) for s in range(3)])     # (B, T, d)
    ctx_b, w_b = simple_attention(xb)
    assert ctx_b.shape == (3, 10, 4) and w_b.shape == (3, 10, 10)
    for b in range(3):
        torch.testing.assert_close(ctx_b[b], context_vectors_loop(xb[b]), atol=1e-6, rtol=0)
        torch.testing.assert_close(w_b[b], attention_weights_loop(xb[b]), atol=1e-6, rtol=0)


def test_softmax_stable_on_large_values():
    big = torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -1002.0], [0.0, 500.0, -500.0]])
    assert torch.isnan(softmax_naive(big[:2])).any(dim=-1).all()       # overflow and underflow
    stable = softmax_stable(big)
    assert torch.isfinite(stable).all()
    torch.testing.assert_close(stable, torch.softmax(big, dim=-1), atol=1e-6, rtol=0)
    x = _random_inputs(6, 6, 768, dtype=torch.float32)
    s = x @ x.T                                                        # scores in the hundreds
    torch.testing.assert_close(softmax_stable(s), torch.softmax(s, dim=-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmaxes_match_torch_on_small_non_square_values(dim):
    x = _random_inputs(7, 4, 3)                                        # non-square: a keepdim slip would raise
    torch.testing.assert_close(softmax_naive(x, dim=dim), torch.softmax(x, dim=dim), atol=1e-6, rtol=0)
    torch.testing.assert_close(softmax_stable(x, dim=dim), torch.softmax(x, dim=dim), atol=1e-6, rtol=0)


def test_bad_inputs_raise_specific_errors():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attention_weights_loop(BOOK_INPUTS.tolist())
    with pytest.raises(ValueError, match=r"must be 2-D \(T, d\)"):
        context_vectors_loop(BOOK_INPUTS[None])
    with pytest.raises(TypeError, match="floating point"):
        attention_weights_loop(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"query must be a tensor of shape \(3,\)"):
        attention_scores_for_query(BOOK_INPUTS, torch.ones(4))
    with pytest.raises(IndexError, match="out of range for 6 tokens"):
        context_vector_for_query(BOOK_INPUTS, 6)
    with pytest.raises(TypeError, match="query_idx must be an int"):
        context_vector_for_query(BOOK_INPUTS, True)
    with pytest.raises(ValueError, match="at least 2 dims"):
        simple_attention(torch.ones(3))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        simple_attention([[1.0]])
