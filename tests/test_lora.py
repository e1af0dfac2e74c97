"""Appendix H: LoRA layers, replacing and merging, adapter-only files and the book's trainable count."""
import copy

import pytest
import torch

from llm_from_scratch.checkpoint import CheckpointError
from llm_from_scratch.classify import to_classifier
from llm_from_scratch.lora import (LinearWithLoRA, LoRALayer, count_trainable, freeze_all_but_lora, is_lora_key,
                                   load_lora, lora_layers, merge_lora, replace_linear_with_lora, save_lora,
                                   training_state_bytes)
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel

TINY = {**GPT_CONFIG_124M, "vocab_size": 100, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0}


@pytest.fixture
def base():
    torch.manual_seed(123)
    return GPTModel(TINY).eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def lora_of(model, rank=4, alpha=8, moved=True):
    "A LoRA copy of `model`; with `moved`, B is random, as after training."
    m = freeze_all_but_lora(replace_linear_with_lora(copy.deepcopy(model), rank, alpha))
    if moved:
        with torch.no_grad():
            for layer in lora_layers(m).values():
                layer.lora.B.normal_(std=0.02)
    return m


def test_zero_b_keeps_outputs(base, tokens):
    m = lora_of(base, moved=False)
    torch.testing.assert_close(m(tokens), base(tokens), rtol=0, atol=0)
    assert all(torch.count_nonzero(layer.lora.B) == 0 for layer in lora_layers(m).values())
    assert all(torch.count_nonzero(layer.lora.A) > 0 for layer in lora_layers(m).values())


def test_keys_and_trainable_counts(base):
    m = lora_of(base, rank=4, moved=False)
    keys = m.state_dict().keys()
    assert {"trf_blocks.0.att.W_query.linear.weight", "trf_blocks.0.att.W_query.lora.A",
            "trf_blocks.0.att.W_query.lora.B", "trf_blocks.1.ff.layers.2.lora.B", "out_head.lora.A"} <= set(keys)
    d, v = TINY["emb_dim"], TINY["vocab_size"]
    per_block = 4 * 4 * (d + d) + 4 * (d + 4 * d) + 4 * (4 * d + d)
    assert count_trainable(m) == TINY["n_layers"] * per_block + 4 * (d + v)
    assert all(is_lora_key(n) == p.requires_grad for n, p in m.named_parameters())


def test_book_count_on_gpt2_small_shape():
    torch.manual_seed(0)
    m = GPTModel(GPT_CONFIG_124M)
    m.out_head = torch.nn.Linear(GPT_CONFIG_124M["emb_dim"], 2)
    for p in m.parameters():
        p.requires_grad = False
    replace_linear_with_lora(m, rank=16, alpha=16)
    assert count_trainable(m) == 2_666_528


def test_update_rank_and_layer(base):
    layer = LinearWithLoRA(torch.nn.Linear(32, 24), rank=3, alpha=2)
    with torch.no_grad():
        layer.lora.B.normal_()
    delta = layer.lora.delta_weight()
    assert delta.shape == (24, 32) and torch.linalg.matrix_rank(delta).item() == 3
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ (layer.linear.weight + delta).T + layer.linear.bias, rtol=1e-5, atol=1e-5)
    assert (layer.in_features, layer.out_features) == (32, 24)
    for bad in (dict(rank=0), dict(rank=2.5), dict(alpha=float("nan"))):
        with pytest.raises(ValueError):
            LoRALayer(4, 4, **{"rank": 2, "alpha": 1, **bad})


def test_merged_equals_unmerged(base, tokens):
    m = lora_of(base)
    before = m(tokens)
    merged = merge_lora(copy.deepcopy(m))
    assert not lora_layers(merged)
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(tokens), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(base)


def test_wrapping_twice_refused(base):
    m = lora_of(base)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        replace_linear_with_lora(m, 4, 8)


def test_save_load_round_trip_only_adapters(base, tokens, tmp_path):
    m = lora_of(base)
    path = save_lora(tmp_path / "a.pth", m)
    stored = torch.load(path, weights_only=True)["model_state_dict"]
    assert stored and all(is_lora_key(k) for k in stored)
    assert len(stored) == 2 * len(lora_layers(m))
    assert not list(tmp_path.glob(".*.tmp"))                      # atomic: no temporary left
    fresh = lora_of(base, moved=False)
    load_lora(path, fresh)
    torch.testing.assert_close(fresh(tokens), m(tokens), rtol=0, atol=0)


def test_include_saves_the_new_head(base, tokens, tmp_path):
    torch.manual_seed(1)
    clf = to_classifier(copy.deepcopy(base))
    m = lora_of(clf)
    path = save_lora(tmp_path / "clf.pth", m, include=("out_head",))
    stored = torch.load(path, weights_only=True)["model_state_dict"]
    assert {"out_head.linear.weight", "out_head.linear.bias"} <= set(stored)
    torch.manual_seed(2)                                          # another random head: restored from the file
    other = lora_of(to_classifier(copy.deepcopy(base)), moved=False)
    load_lora(path, other)
    torch.testing.assert_close(other(tokens), m(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="names no tensor"):
        save_lora(tmp_path / "x.pth", m, include=("nothing_here",))


def test_wrong_rank_alpha_model_refused(base, tmp_path):
    path = save_lora(tmp_path / "a.pth", lora_of(base, rank=4, alpha=8))
    with pytest.raises(CheckpointError, match=r"trf_blocks\.0\.att\.W_query\.lora\.A.*shape") as e:
        load_lora(path, lora_of(base, rank=2, alpha=8, moved=False))
    assert "lora_rank=4 (model: 2)" in str(e.value)
    with pytest.raises(CheckpointError, match="lora_alpha=8"):
        load_lora(path, lora_of(base, rank=4, alpha=4, moved=False))
    with pytest.raises(CheckpointError, match="no LoRA layers"):
        load_lora(path, copy.deepcopy(base))
    torch.manual_seed(5)
    deeper = GPTModel({**TINY, "n_layers": 3})
    with pytest.raises(CheckpointError, match=r"missing \(12\): trf_blocks\.2\.att\.W_query\.lora\.A"):
        load_lora(path, lora_of(deeper, moved=False))
    torch.manual_seed(6)
    with pytest.raises(CheckpointError, match="other base weights"):
        load_lora(path, lora_of(GPTModel(TINY), moved=False))
    load_lora(path, lora_of(GPTModel(TINY), moved=False), check_base=False)   # on purpose: allowed


def test_whole_checkpoint_is_not_an_adapter_file(base, tmp_path):
    from llm_from_scratch.checkpoint import save_checkpoint
    path = save_checkpoint(tmp_path / "whole.pth", base)
    with pytest.raises(CheckpointError, match="not a LoRA adapter file"):
        load_lora(path, lora_of(base, moved=False))


def test_training_state_bytes(base, tokens):
    m = lora_of(base)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m(tokens).sum().backward()
    opt.step()
    n = count_trainable(m)
    got = training_state_bytes(m, opt)
    assert got["grads"] == 4 * n
    assert got["optimizer"] >= 2 * 4 * n                          # two averages per weight (+ step counters)
    assert got["params"] == 4 * sum(p.numel() for p in m.parameters())
