"""Part 21's decoding and perplexity, independent of the notebooks' prose: greedy, temperature, top-k, eos,
seeds, cropping, bad input, and perplexity = exp(mean loss)."""
import math
import warnings

import pytest
import torch

from llm_from_scratch.generate import PromptCroppedWarning, generate, next_token_probs
from llm_from_scratch.loss import calc_loss_batch, perplexity, token_surprisal
from llm_from_scratch.model import GPTModel, generate_text_simple

CFG = {"vocab_size": 101, "context_length": 12, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPTModel(CFG).eval()
    with torch.no_grad():
        m.out_head.weight.mul_(8)            # peaked enough that sampling and argmax differ visibly
    return m


@pytest.fixture
def prompts():
    return torch.tensor([[1, 2, 3], [40, 50, 60]])


def test_temperature_zero_is_greedy(model, prompts):
    assert torch.equal(generate(model, prompts, 9, CFG["context_length"], temperature=0.0),
                       generate_text_simple(model, prompts, 9, CFG["context_length"]))
    # top_k never changes the argmax
    assert torch.equal(generate(model, prompts, 9, CFG["context_length"], temperature=0.0, top_k=3),
                       generate_text_simple(model, prompts, 9, CFG["context_length"]))


def test_top_k_never_samples_outside_the_top_k(model):
    prompt = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        logits = model(prompt)[0, -1]                                   # (V,)
    allowed = set(logits.topk(4).indices.tolist())
    torch.manual_seed(1)
    drawn = generate(model, prompt.expand(3000, -1), 1, CFG["context_length"], temperature=2.0, top_k=4)[:, -1]
    assert set(drawn.tolist()) == allowed                               # all four appear, nothing else
    # and over several steps: every new token lies in the top 4 of the logits at its step
    torch.manual_seed(2)
    out = generate(model, prompt.expand(50, -1), 6, CFG["context_length"], temperature=1.5, top_k=4)
    with torch.no_grad():
        for t in range(prompt.shape[1], out.shape[1]):
            top = model(out[:, max(0, t - CFG["context_length"]):t])[:, -1].topk(4).indices   # (B, 4)
            assert (top == out[:, t:t + 1]).any(dim=1).all()


def test_sampled_frequencies_follow_the_probabilities(model):
    prompt = torch.tensor([[5, 6]])
    with torch.no_grad():
        probs = next_token_probs(model(prompt)[0, -1], temperature=1.0, top_k=5)
    torch.manual_seed(3)
    n = 20_000
    drawn = generate(model, prompt.expand(n, -1), 1, CFG["context_length"], temperature=1.0, top_k=5)[:, -1]
    freq = torch.bincount(drawn, minlength=CFG["vocab_size"]).float() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-9).all()


def test_a_fixed_seed_reproduces_the_sample(model, prompts):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(generate(model, prompts, 10, CFG["context_length"], temperature=1.3, top_k=20))
    assert torch.equal(*runs)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(generate(model, prompts, 10, 12, temperature=1.3, generator=g1),
                       generate(model, prompts, 10, 12, temperature=1.3, generator=g2))
    torch.manual_seed(124)
    assert not torch.equal(runs[0], generate(model, prompts, 10, CFG["context_length"], temperature=1.3, top_k=20))


def test_eos_stops_and_pads_finished_rows(model, prompts):
    greedy = generate(model, prompts, 8, CFG["context_length"])
    eos = int(greedy[0, prompts.shape[1] + 2])                          # the third token row 0 would produce
    out = generate(model, prompts, 8, CFG["context_length"], eos_id=eos)
    row0 = out[0, prompts.shape[1]:].tolist()
    assert row0[:2] == greedy[0, prompts.shape[1]:prompts.shape[1] + 2].tolist()
    assert all(t == eos for t in row0[2:])                              # finished: padded with eos
    single = generate(model, prompts[:1], 8, CFG["context_length"], eos_id=eos)
    assert single.shape[1] == prompts.shape[1] + 2                      # alone, it stops before appending eos


def test_long_prompt_is_cropped_with_a_warning(model):
    long = torch.arange(20).unsqueeze(0) % CFG["vocab_size"]           # (1, 20) > context_length 12
    with pytest.warns(PromptCroppedWarning, match="only reads the last 12"):
        out = generate(model, long, 4, CFG["context_length"])
    assert torch.equal(out[:, :20], long)                               # the whole prompt is kept in the output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cropped = generate(model, long[:, -12:], 4, CFG["context_length"])
    assert torch.equal(out[:, 20:], cropped[:, 12:])


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"temperature": -0.1}, ValueError, "must be >= 0"),
    ({"temperature": float("nan")}, ValueError, "must be >= 0"),
    ({"temperature": 1.0, "top_k": 0}, ValueError, "top_k=0 must be between 1"),
    ({"temperature": 1.0, "top_k": 102}, ValueError, "vocabulary size 101"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens=-1"),
    ({"context_size": 0}, ValueError, "context_size=0"),
    ({"eos_id": -3}, ValueError, "eos_id=-3"),
])
def test_bad_arguments_are_named(model, prompts, kwargs, exc, msg):
    args = {"max_new_tokens": 3, "context_size": CFG["context_length"], **kwargs}
    with pytest.raises(exc, match=msg):
        generate(model, prompts, **args)


def test_context_larger_than_the_model_names_the_fix_and_the_fix_works(model, prompts):
    too_big = CFG["context_length"] + 1
    with pytest.raises(ValueError, match=rf"context_size={too_big} is more than this model can read") as e:
        generate(model, prompts, 3, too_big)
    advised = int(str(e.value).split("Pass context_size=")[1].split(" ")[0])
    assert advised == CFG["context_length"]
    assert generate(model, prompts, 3, advised).shape == (prompts.shape[0], prompts.shape[1] + 3)   # the advice works


def test_bad_prompts_are_named(model, prompts):
    with pytest.raises(ValueError, match=r"\(batch, num_tokens\)"):
        generate(model, prompts[0], 3, 12)
    with pytest.raises(TypeError, match="torch.long"):
        generate(model, prompts.float(), 3, 12)
    with pytest.raises(TypeError, match="LongTensor"):
        generate(model, [[1, 2]], 3, 12)


def test_perplexity_is_exp_of_the_mean_loss(model):
    torch.manual_seed(4)
    x = torch.randint(0, CFG["vocab_size"], (1, CFG["context_length"] + 1))
    with torch.no_grad():
        loss = calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu")
    surprisal = token_surprisal(model, x[0, :-1])                       # (T-1,) nats
    with torch.no_grad():
        loss_same = calc_loss_batch(x[:, :-2], x[:, 1:-1], model, "cpu")
    assert surprisal.mean().item() == pytest.approx(loss_same.item(), abs=1e-5)
    assert perplexity(loss.item()) == pytest.approx(math.exp(loss.item()))
    torch.testing.assert_close(perplexity(loss), torch.exp(loss))
    uniform = torch.zeros(1, 5, CFG["vocab_size"])                      # a model that knows nothing
    ce = torch.nn.functional.cross_entropy(uniform.flatten(0, 1), torch.zeros(5, dtype=torch.long))
    assert perplexity(ce.item()) == pytest.approx(CFG["vocab_size"], rel=1e-5)
