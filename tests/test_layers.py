"""LayerNorm, GELU, FeedForward (parts 16-17) and the residual experiment (part 18)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_from_scratch.feed_forward import GELU, FeedForward
from llm_from_scratch.layer_norm import LayerNorm
from llm_from_scratch.residual import ExampleDeepNeuralNetwork, weight_gradient_means


def test_layer_norm_matches_torch():
    torch.manual_seed(0)
    ours, ref = LayerNorm(32).double(), nn.LayerNorm(32, eps=1e-5).double()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(32) * 0.5 + 1)
        ref.bias.copy_(torch.randn(32))
        ours.scale.copy_(ref.weight)
        ours.shift.copy_(ref.bias)
    x = torch.randn(2, 5, 32, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
    assert list(ours.state_dict()) == ["scale", "shift"]


def test_layer_norm_eps_and_bad_input():
    assert torch.isfinite(LayerNorm(4)(torch.ones(1, 4))).all()
    assert torch.isnan(LayerNorm(4, eps=0.0)(torch.ones(1, 4))).all()
    with pytest.raises(ValueError, match="emb_dim=8"):
        LayerNorm(8)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="positive int"):
        LayerNorm(0)


def test_gelu_matches_torch_tanh():
    x = torch.linspace(-8, 8, 1001)
    torch.testing.assert_close(GELU()(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=0)
    assert (GELU()(x) - F.gelu(x)).abs().max() < 1e-3


def test_feed_forward_keys_shapes():
    ff = FeedForward({"emb_dim": 8, "n_heads": 2})
    shapes = {k: tuple(v.shape) for k, v in ff.state_dict().items()}
    assert shapes == {"layers.0.weight": (32, 8), "layers.0.bias": (32,),
                      "layers.2.weight": (8, 32), "layers.2.bias": (8,)}
    x = torch.randn(2, 3, 8)
    assert ff(x).shape == x.shape
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(ff(x[:, perm]), ff(x)[:, perm], atol=1e-6, rtol=0)


def test_feed_forward_bad_input():
    with pytest.raises(KeyError, match="emb_dim"):
        FeedForward({"n_heads": 2})
    with pytest.raises(TypeError, match="config dict"):
        FeedForward(8)
    with pytest.raises(ValueError, match="emb_dim=8"):
        FeedForward({"emb_dim": 8})(torch.randn(2, 5))


def test_residual_gradient_experiment():
    x, target = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0]])
    torch.manual_seed(123)
    plain = ExampleDeepNeuralNetwork([3, 3, 3, 3, 3, 1], use_shortcut=False)
    torch.manual_seed(123)
    short = ExampleDeepNeuralNetwork([3, 3, 3, 3, 3, 1], use_shortcut=True)
    g_plain = weight_gradient_means(plain, x, target)
    g_short = weight_gradient_means(short, x, target)
    assert list(g_plain) == [f"layers.{i}.0.weight" for i in range(5)]
    assert g_short["layers.0.0.weight"] > 100 * g_plain["layers.0.0.weight"]
    assert g_plain["layers.0.0.weight"] < g_plain["layers.4.0.weight"]
    assert abs(g_plain["layers.0.0.weight"] / 0.00020173587836325169 - 1) < 1e-3   # the book's printed value


def test_residual_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        ExampleDeepNeuralNetwork([3], use_shortcut=True)
    with pytest.raises(TypeError, match="True or False"):
        ExampleDeepNeuralNetwork([3, 3], use_shortcut=1)
    with pytest.raises(ValueError, match="layer_sizes"):
        ExampleDeepNeuralNetwork([3, 3], use_shortcut=True)(torch.randn(1, 4))


def _gelu_rms_factor(a, n=20_000):
    "rms(GELU(a z)) / rms(a z) for z ~ N(0, 1), on a grid of normal quantiles (part 16's fixed-point argument)."
    z = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return (GELU()(a * z).pow(2).mean().sqrt() / (a * z).pow(2).mean().sqrt()).item()


def test_gelu_scale_factor_rises_from_half_to_relu_value():
    # One Linear(gain) + GELU layer scales its input by gain * r(a); r rises from 1/2 to 1/sqrt(2), so a
    # fixed point gain * r(a*) = 1 exists only for sqrt(2) < gain < 2, and it is unstable (r increases).
    scales = [1e-3, 0.1, 0.5, 1.0, 2.0, 10.0, 1e3]
    r = [_gelu_rms_factor(a) for a in scales]
    assert all(r1 < r2 for r1, r2 in zip(r, r[1:]))
    assert abs(r[0] - 0.5) < 1e-3 and abs(r[-1] - 2 ** -0.5) < 1e-3


def test_attention_over_one_token_is_affine():
    # Part 17: with a single token to attend to, attention is an affine map of that token's features.
    from llm_from_scratch.attention import MultiHeadAttention
    torch.manual_seed(0)
    att = MultiHeadAttention(8, 8, context_length=4, dropout=0.0, num_heads=2, qkv_bias=True).eval()
    x1, x2 = torch.randn(2, 1, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(att(0.3 * x1 + 0.7 * x2), 0.3 * att(x1) + 0.7 * att(x2), atol=1e-5, rtol=1e-5)
        two = torch.cat([x1, x2], dim=1)                                   # (1, 2, 8): with a second token it is not
        mixed = torch.cat([x1, 0.3 * x1 + 0.7 * x2], dim=1)
        assert not torch.allclose(att(mixed)[:, 1], 0.3 * att(torch.cat([x1, x1], 1))[:, 1] + 0.7 * att(two)[:, 1], atol=1e-4)
