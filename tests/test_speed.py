"""Appendix E's fast path: the same results as the explicit path, within float tolerance (tiny configs, CPU)."""
import pytest
import torch

from llm_from_scratch.core import set_seed
from llm_from_scratch.loss import calc_loss_batch
from llm_from_scratch.model import GPTModel, GPT_CONFIG_124M
from llm_from_scratch.speed import (FastGPTModel, check_batch_split, fast_adamw, make_fast, padded_vocab_size,
                                    race, rank_share, setup_distributed, train_step, training_flops_per_token)

CFG = {"vocab_size": 1000, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}


def _batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CFG["vocab_size"], (b, CFG["context_length"]), generator=g),
            torch.randint(0, CFG["vocab_size"], (b, CFG["context_length"]), generator=g))


def test_padded_vocab_size():
    assert padded_vocab_size(50257) == 50304 and padded_vocab_size(64) == 64 and padded_vocab_size(1000, 128) == 1024
    with pytest.raises(ValueError, match="positive int"):
        padded_vocab_size(0)


@pytest.mark.parametrize("pad", [None, 64, 128])
def test_fast_model_matches_the_explicit_model_logits_and_gradients(pad):
    set_seed(1)
    plain = GPTModel(CFG)
    fast = make_fast(plain, pad_vocab_multiple=pad)
    x, y = _batch()
    lp, lf = calc_loss_batch(x, y, plain, "cpu"), calc_loss_batch(x, y, fast, "cpu")
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    assert fast(x).shape == (3, 16, CFG["vocab_size"])                  # padding never shows
    lp.backward()
    lf.backward()
    V = CFG["vocab_size"]
    fast_grads = dict(fast.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(fast_grads[name].grad[:p.shape[0]], p.grad, rtol=1e-4, atol=1e-6)
    if pad:
        assert fast.out_head.weight.grad[V:].abs().max() == 0           # padding rows are never trained
    back = GPTModel(CFG)
    back.load_state_dict(fast.book_state_dict(), strict=True)
    assert list(fast.state_dict()) == list(plain.state_dict())         # the book's keys


def test_make_fast_leaves_the_original_alone_and_checks_its_input():
    set_seed(2)
    plain = GPTModel(CFG)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    make_fast(plain, tie_weights=True)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    with pytest.raises(TypeError, match="expected a GPTModel"):
        make_fast(torch.nn.Linear(2, 2))


def test_tied_weights_share_one_matrix():
    m = FastGPTModel(CFG, tie_weights=True)
    assert m.out_head.weight is m.tok_emb.weight
    sd = m.book_state_dict()
    assert sd["out_head.weight"].shape == (CFG["vocab_size"], CFG["emb_dim"])
    assert torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])


def test_fused_adamw_and_train_step_match_the_books_step():
    x, y = _batch(3)
    runs = []
    for fused in (False, True):
        set_seed(3)
        m = GPTModel({**CFG}, use_sdpa=fused)
        opt = fast_adamw(m) if fused else torch.optim.AdamW(m.parameters(), lr=4e-4, weight_decay=0.1)
        losses = []
        for _ in range(4):
            if fused:
                losses.append(train_step(m, opt, x, y, "cpu").item())
            else:
                opt.zero_grad()
                loss = calc_loss_batch(x, y, m, "cpu")
                loss.backward()
                opt.step()
                losses.append(loss.item())
        runs.append((losses, m.state_dict()))
    torch.testing.assert_close(torch.tensor(runs[1][0]), torch.tensor(runs[0][0]), rtol=1e-5, atol=1e-6)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_step_stays_close_and_keeps_float32_weights():
    x, y = _batch(4)
    set_seed(4)
    m = make_fast(GPTModel(CFG))
    ref = calc_loss_batch(x, y, m, "cpu").item()
    loss = train_step(m, fast_adamw(m), x, y, "cpu", autocast_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 0.05
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_flops_per_token_of_gpt2_small():
    fpt = training_flops_per_token({**GPT_CONFIG_124M, "context_length": 256})
    n = 12 * 12 * 768 * 768 + 768 * 50257
    assert fpt == 6 * n + 12 * 12 * 256 * 768


def test_race_alternates_and_times_every_contestant():
    calls = []
    times = race({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup_rounds=1)
    assert calls == ["a", "b"] * 4 and [len(v) for v in times.values()] == [3, 3]
    with pytest.raises(ValueError):
        race({})


def test_rank_shares_cover_the_batch():
    for n, world in [(8, 2), (7, 3), (4, 4)]:
        batch = list(range(100, 100 + n))
        shares = [rank_share(batch, r, world) for r in range(world)]
        assert sum(shares, []) == batch and max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank"):
        rank_share([1, 2], 2, 2)
    with pytest.raises(ValueError, match="cannot be split"):
        check_batch_split([4, 1], 2)


def test_setup_distributed_outside_torchrun_says_how_to_launch():
    with pytest.raises(RuntimeError, match="torchrun"):
        setup_distributed()
