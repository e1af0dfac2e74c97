"""Tests for llm_from_scratch.data (part 3). Need LLM_FROM_SCRATCH_DATA (or the cache) for The Verdict."""
import pytest
import torch

from llm_from_scratch.data import GPTDatasetV1, GPTEmbedding, create_dataloader_v1, num_windows
from llm_from_scratch.download import read_text
from llm_from_scratch.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module")
def verdict():
    return read_text("the-verdict.txt")


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def verdict_ids(verdict, tokenizer):
    return tokenizer.encode(verdict, allowed_special={"<|endoftext|>"})


def test_verdict_token_count(verdict_ids):
    assert len(verdict_ids) == 5145


@pytest.mark.parametrize("batch_size,max_length,stride", [(4, 256, 128), (8, 4, 4), (1, 4, 1), (3, 32, 7)])
def test_targets_are_inputs_shifted_by_one(verdict, verdict_ids, batch_size, max_length, stride):
    """Acceptance check: on The Verdict every target row is its input row shifted one token."""
    ids = torch.tensor(verdict_ids)
    loader = create_dataloader_v1(verdict, batch_size=batch_size, max_length=max_length, stride=stride,
                                  shuffle=False, drop_last=True)
    n_batches = 0
    for b, (inputs, targets) in enumerate(loader):
        assert inputs.dtype == targets.dtype == torch.long
        assert inputs.shape == targets.shape == (batch_size, max_length)
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        for r in range(batch_size):
            s = (b * batch_size + r) * stride
            assert torch.equal(inputs[r], ids[s:s + max_length])
            assert torch.equal(targets[r], ids[s + 1:s + max_length + 1])
        n_batches += 1
    assert n_batches == num_windows(len(verdict_ids), max_length, stride) // batch_size > 0


def test_shuffled_loader_rows_shifted(verdict):
    torch.manual_seed(0)
    loader = create_dataloader_v1(verdict, batch_size=4, max_length=256, stride=128)
    for inputs, targets in loader:
        assert torch.equal(targets[:, :-1], inputs[:, 1:])


def test_book_first_batches(verdict):
    it = iter(create_dataloader_v1(verdict, batch_size=1, max_length=4, stride=1, shuffle=False))
    x0, y0 = next(it)
    x1, _ = next(it)
    assert x0.tolist() == [[40, 367, 2885, 1464]] and y0.tolist() == [[367, 2885, 1464, 1807]]
    assert x1.tolist() == [[367, 2885, 1464, 1807]]


@pytest.mark.parametrize("max_length,stride", [(1, 1), (4, 1), (4, 4), (4, 6), (7, 3), (256, 128), (256, 256),
                                               (256, 1), (100, 1000), (5144, 1)])
def test_num_windows_formula(verdict, verdict_ids, tokenizer, max_length, stride):
    n = len(verdict_ids)
    expected = len(range(0, n - max_length, stride))               # starts whose window of max_length+1 fits
    assert num_windows(n, max_length, stride) == expected == (n - max_length - 1) // stride + 1
    ds = GPTDatasetV1(verdict, tokenizer, max_length, stride)
    assert len(ds) == expected
    windows = torch.tensor(verdict_ids).unfold(0, max_length + 1, stride)
    assert windows.shape[0] == expected
    x, y = ds[len(ds) - 1]
    assert torch.equal(x, windows[-1, :-1]) and torch.equal(y, windows[-1, 1:])


def test_book_batch_of_eight(verdict):
    """The batch the book prints in section 2.6 (batch 8, max_length 4, stride 4)."""
    inputs, targets = next(iter(create_dataloader_v1(verdict, batch_size=8, max_length=4, stride=4, shuffle=False)))
    assert inputs[:3].tolist() == [[40, 367, 2885, 1464], [1807, 3619, 402, 271], [10899, 2138, 257, 7026]]
    assert inputs[-1].tolist() == [284, 3285, 326, 11] and targets[-1].tolist() == [3285, 326, 11, 287]


def test_num_windows_brute_force():
    for n in range(0, 30):
        for max_length in range(1, 9):
            for stride in range(1, 11):
                brute = sum(1 for s in range(0, n, stride) if s + max_length + 1 <= n)
                assert num_windows(n, max_length, stride) == brute


@pytest.mark.parametrize("kwargs,match", [(dict(max_length=0, stride=1), "max_length must be at least 1"),
                                          (dict(max_length=-3, stride=1), "max_length must be at least 1"),
                                          (dict(max_length=4, stride=0), "stride must be at least 1"),
                                          (dict(max_length=4, stride=-1), "stride must be at least 1")])
def test_bad_sizes_raise(verdict, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTDatasetV1(verdict, tokenizer, **kwargs)
    with pytest.raises(ValueError, match=match):
        create_dataloader_v1(verdict, **kwargs)


def test_bad_types_raise(verdict, tokenizer):
    with pytest.raises(TypeError, match="max_length must be an int"):
        GPTDatasetV1(verdict, tokenizer, max_length=4.5, stride=1)
    with pytest.raises(TypeError, match="txt must be a str"):
        GPTDatasetV1(["a", "b"], tokenizer, max_length=1, stride=1)


def test_too_short_text_raises(tokenizer):
    text = "I HAD always"                                            # 4 tokens
    assert len(tokenizer.encode(text)) == 4
    with pytest.raises(ValueError, match=r"the text has 4 tokens.*needs 5"):
        GPTDatasetV1(text, tokenizer, max_length=4, stride=1)
    with pytest.raises(ValueError, match="the text has 0 tokens"):
        GPTDatasetV1("", tokenizer, max_length=1, stride=1)
    assert len(GPTDatasetV1(text, tokenizer, max_length=3, stride=1)) == 1   # exactly one window fits


def test_empty_loader_refused(verdict):
    short = verdict[:2000]
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        create_dataloader_v1(short, batch_size=8, max_length=256, stride=256)
    assert len(create_dataloader_v1(short, batch_size=8, max_length=256, stride=256, drop_last=False)) == 1
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        create_dataloader_v1(verdict, batch_size=0)


def test_endoftext_allowed(tokenizer):
    ds = GPTDatasetV1("Hello world.<|endoftext|>Another text here.", tokenizer, max_length=3, stride=1)
    assert any(50256 in x.tolist() for x, _ in ds)


def test_gpt_embedding_shapes_and_errors():
    torch.manual_seed(123)
    emb = GPTEmbedding(vocab_size=50257, emb_dim=256, context_length=4)
    idx = torch.randint(0, 50257, (8, 4))
    out = emb(idx)
    assert out.shape == (8, 4, 256)
    torch.testing.assert_close(out, emb.tok_emb(idx) + emb.pos_emb(torch.arange(4)), atol=0, rtol=0)
    assert list(emb.state_dict()) == ["tok_emb.weight", "pos_emb.weight"]
    assert emb(idx[:, :2]).shape == (8, 2, 256)                     # shorter sequences are fine
    with pytest.raises(ValueError, match="context_length=4"):
        emb(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="batch dimension"):
        emb(torch.zeros(4, dtype=torch.long))


def test_position_embeddings_break_permutation_symmetry():
    torch.manual_seed(0)
    emb = GPTEmbedding(vocab_size=100, emb_dim=16, context_length=5)
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    perm = torch.tensor([4, 2, 0, 1, 3])
    tok = emb.tok_emb
    assert torch.equal(tok(idx[:, perm]), tok(idx)[:, perm])       # tokens alone: a pure permutation
    assert not torch.allclose(emb(idx[:, perm]), emb(idx)[:, perm])  # with positions: not any more
