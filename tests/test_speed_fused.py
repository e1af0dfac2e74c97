"""Appendix E's fused training path: one kernel per LayerNorm/GELU, attention fused only where a fused kernel
exists, and the chunked cross-entropy. Each must compute what the spelled-out path computes (tiny configs, CPU)."""
import pytest
import torch
import torch.nn.functional as F

from llm_from_scratch.core import set_seed
from llm_from_scratch.loss import calc_loss_batch
from llm_from_scratch.model import GPTModel
from llm_from_scratch.speed import chunked_cross_entropy, fast_adamw, fast_dropout, make_fast, train_step

CFG = {"vocab_size": 500, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
       "drop_rate": 0.1, "qkv_bias": True}


def _batch(seed=0, b=3, t=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CFG["vocab_size"], (b, t), generator=g),
            torch.randint(0, CFG["vocab_size"], (b, t), generator=g))


@pytest.mark.parametrize("t", [16, 5])
def test_fused_forward_equals_the_models_own_in_eval(t):
    set_seed(0)
    plain = GPTModel(CFG).eval()
    fused, unfused = make_fast(plain, pad_vocab_multiple=None), make_fast(plain, pad_vocab_multiple=None, fuse_small_ops=False)
    x, _ = _batch(1, t=t)
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unfused(x), ref, rtol=1e-5, atol=1e-5)
        fused.set_sdpa(False)                                  # the explicit attention inside the fused blocks
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)


def test_fused_training_forward_draws_the_same_dropout_as_the_explicit_model():
    """In training on a CPU the fused path uses the explicit attention (SDPA has no fused kernel with dropout
    there) and, with fast_dropout=False, draws the dropout masks as the model does: same seed, same logits and
    gradients."""
    set_seed(0)
    plain = GPTModel(CFG).train()                              # explicit attention, spelled-out small ops
    fused = make_fast(plain, pad_vocab_multiple=None, fast_dropout=False).train()   # use_sdpa=True, but dropout on a CPU
    x, y = _batch(2)
    set_seed(5)
    lp = calc_loss_batch(x, y, plain, "cpu")
    set_seed(5)
    lf = calc_loss_batch(x, y, fused, "cpu")
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    set_seed(6)
    other = calc_loss_batch(x, y, fused, "cpu")
    assert abs(other.item() - lf.item()) > 1e-4                # dropout is really on
    lp.backward()
    lf.backward()
    fused_grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(fused_grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hooked_and_replaced_modules_are_called_as_they_are():
    set_seed(0)
    fused = make_fast(GPTModel(CFG), pad_vocab_multiple=None).eval()
    calls = []
    fused.trf_blocks[0].norm1.register_forward_hook(lambda m, i, o: calls.append("norm1"))
    fused.trf_blocks[1].att.register_forward_hook(lambda m, i, o: calls.append("att"))
    fused.trf_blocks[1].ff.layers[1].register_forward_hook(lambda m, i, o: calls.append("gelu"))
    fused(_batch()[0])
    assert sorted(calls) == ["att", "gelu", "norm1"]
    fused.trf_blocks[0].ff.layers[1] = torch.nn.ReLU()         # a different activation must be honoured
    x = _batch()[0]
    with torch.no_grad():
        got = fused(x)
        fused.fuse_small_ops = False
        torch.testing.assert_close(got, fused(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_drops_a_share_p_and_scales_the_rest(p):
    """Each element is dropped with probability p (checked within 5 standard errors on 2**22 elements, for the
    elements drawn from the low and the high half of each 64-bit draw separately); the rest are scaled by
    1/(1-p), and the gradient is the same mask times the same scale."""
    torch.manual_seed(11)
    x = (torch.rand(1 << 22) + 0.5).requires_grad_()           # no zeros: a zero output means dropped
    y = fast_dropout(x, p)
    dropped = y == 0
    se = (p * (1 - p) / (x.numel() / 2)) ** 0.5
    for half in (dropped[0::2], dropped[1::2]):
        assert abs(half.float().mean().item() - p) < 5 * se
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, kept.float() * 2.0 / (1 - p), rtol=1e-6, atol=0)


def test_fast_dropout_edge_cases_seed_and_errors():
    x = torch.randn(5, 7, 3)
    assert fast_dropout(x, 0.3, training=False) is x and fast_dropout(x, 0.0) is x
    assert not fast_dropout(x, 1.0).any() and fast_dropout(x, 1.0).shape == x.shape
    torch.manual_seed(3)
    a = fast_dropout(x, 0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(fast_dropout(x, 0.5), a, rtol=0, atol=0)    # the global seed decides the mask
    assert not torch.equal(fast_dropout(x, 0.5), a)
    assert fast_dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16
    odd = torch.randn(7)                                       # an odd count: half of the last 64-bit draw unused
    assert fast_dropout(odd, 0.5).shape == (7,)
    for bad in (-0.1, 1.5, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match="must be a number in"):
            fast_dropout(x, bad)


def test_fast_dropout_in_the_model_same_distribution_other_draws():
    """With fast_dropout=True (the default) training differs from the explicit model's draws but repeats itself
    for one seed, eval is untouched, and with dropout 0 training equals the explicit model."""
    set_seed(0)
    plain = GPTModel(CFG).train()
    fused = make_fast(plain, pad_vocab_multiple=None).train()
    assert fused.fast_dropout
    x, y = _batch(2)
    set_seed(5)
    lp = calc_loss_batch(x, y, plain, "cpu")
    set_seed(5)
    lf = calc_loss_batch(x, y, fused, "cpu")
    set_seed(5)
    assert calc_loss_batch(x, y, fused, "cpu").item() == lf.item()
    assert abs(lf.item() - lp.item()) > 1e-4                   # other masks
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
    set_seed(0)
    plain0 = GPTModel({**CFG, "drop_rate": 0.0}).train()
    fused0 = make_fast(plain0, pad_vocab_multiple=None).train()
    torch.testing.assert_close(calc_loss_batch(x, y, fused0, "cpu"), calc_loss_batch(x, y, plain0, "cpu"),
                               rtol=1e-5, atol=1e-6)


def test_a_hooked_dropout_is_called_as_it_is():
    set_seed(0)
    fused = make_fast(GPTModel(CFG), pad_vocab_multiple=None).train()
    calls = []
    fused.trf_blocks[0].drop_shortcut.register_forward_hook(lambda m, i, o: calls.append("shortcut"))
    fused.trf_blocks[1].att.dropout.register_forward_hook(lambda m, i, o: calls.append("att"))
    fused(_batch()[0])
    assert calls == ["shortcut", "shortcut", "att"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chunked_cross_entropy_equals_pytorchs_loss_and_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 101, generator=g) * 3).to(dtype).requires_grad_()   # (N, V)
    targets = torch.randint(0, 101, (37,), generator=g)
    targets[[0, 3, 36]] = -100
    ref = F.cross_entropy(logits.to(torch.float64 if dtype == torch.float64 else torch.float32), targets)
    ref.backward()
    ref_grad, logits.grad = logits.grad.clone(), None
    for chunk_bytes in (4 * 101 * 5, 4 * 101 * 37, 1, 2**24):  # 8 chunks (last short), one exact, one row, one big
        got = chunked_cross_entropy(logits, targets, chunk_bytes=chunk_bytes)
        got.backward()
        assert got.dtype == ref.dtype and logits.grad.dtype == dtype
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-5, atol=1e-7)
        assert not logits.grad[[0, 3, 36]].any()               # ignored rows get no gradient
        logits.grad = None


def test_chunked_cross_entropy_edge_cases_and_errors():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = chunked_cross_entropy(logits, torch.full((4,), -100))
    loss.backward()
    ref = F.cross_entropy(logits, torch.full((4,), -100))
    assert loss.isnan() and ref.isnan() and not logits.grad.any()
    assert chunked_cross_entropy(logits, torch.full((4,), 7), ignore_index=7).isnan()
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\].*from 0 to 10"):
        chunked_cross_entropy(logits, torch.tensor([1, 2, 10, 0]))
    with pytest.raises(ValueError, match="must lie in"):
        chunked_cross_entropy(logits, torch.tensor([1, -2, 3, 0]))
    with pytest.raises(ValueError, match="flatten"):
        chunked_cross_entropy(logits.unsqueeze(0), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        chunked_cross_entropy(logits, torch.zeros(4))
    with pytest.raises(TypeError, match="must be tensors"):
        chunked_cross_entropy(logits, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="V >= 1"):
        chunked_cross_entropy(torch.zeros(4, 0), torch.zeros(4, dtype=torch.long))
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="chunk_bytes"):
            chunked_cross_entropy(logits, torch.zeros(4, dtype=torch.long), chunk_bytes=bad)


def test_train_step_with_the_chunked_loss_takes_the_same_step():
    x, y = _batch(3)
    y[0, :4] = -100                                            # padding targets, as instruction batches have
    results = []
    for ce in (F.cross_entropy, chunked_cross_entropy):
        set_seed(3)
        # no key bias: its true gradient is 0 (softmax ignores a shift shared by a row), and AdamW would blow
        # the two losses' different rounding noise up to full-size steps
        m = make_fast(GPTModel({**CFG, "drop_rate": 0.0, "qkv_bias": False}), pad_vocab_multiple=None).train()
        opt = fast_adamw(m)
        losses = [train_step(m, opt, x, y, "cpu", cross_entropy=ce).item() for _ in range(3)]
        results.append((losses, m.state_dict()))
    torch.testing.assert_close(torch.tensor(results[1][0]), torch.tensor(results[0][0]), rtol=1e-6, atol=1e-6)
    for k, v in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_bf16_step_with_the_chunked_loss_matches_pytorchs_loss_under_autocast():
    x, y = _batch(4)
    losses = []
    for ce in (F.cross_entropy, chunked_cross_entropy):
        set_seed(4)
        m = make_fast(GPTModel({**CFG, "drop_rate": 0.0}), pad_vocab_multiple=None).train()
        losses.append(train_step(m, fast_adamw(m), x, y, "cpu", autocast_dtype=torch.bfloat16, cross_entropy=ce))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert losses[1].dtype == torch.float32


def test_train_step_with_another_loss_refuses_bad_batches_before_any_work():
    m = make_fast(GPTModel(CFG), pad_vocab_multiple=None)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = fast_adamw(m)
    x, y = _batch(5)
    with pytest.raises(TypeError, match="must be tensors of token ids"):
        train_step(m, opt, x, y.tolist(), "cpu", cross_entropy=chunked_cross_entropy)
    with pytest.raises(ValueError, match=r"the same shape .*\(3, 16\) and \(3, 15\)"):
        train_step(m, opt, x, y[:, :-1], "cpu", cross_entropy=chunked_cross_entropy)
    with pytest.raises(ValueError, match="flatten"):                # the loss itself still checks its shapes
        chunked_cross_entropy(torch.zeros(3, 16, 10), y)
    y_bad = y.clone()
    y_bad[0, 0] = CFG["vocab_size"]
    with pytest.raises(ValueError, match="must lie in"):
        train_step(m, opt, x, y_bad, "cpu", cross_entropy=chunked_cross_entropy)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k                     # no step was taken
