"""Tests for llm_from_scratch.model (part 19): names, loading, validation, generation, equivalences."""
import io

import pytest
import torch

from llm_from_scratch.model import (GPT2_SIZES, GPT_CONFIG_124M, GPTModel, TransformerBlock, count_parameters,
                                    count_parameters_from_config, generate_text_simple, gpt2_config, gpt2_size_name,
                                    validate_config)

TINY = {"vocab_size": 97, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.1, "qkv_bias": False}

BOOK_BLOCK_KEYS = ["att.mask", "att.W_query.weight", "att.W_key.weight", "att.W_value.weight",
                   "att.out_proj.weight", "att.out_proj.bias",
                   "ff.layers.0.weight", "ff.layers.0.bias", "ff.layers.2.weight", "ff.layers.2.bias",
                   "norm1.scale", "norm1.shift", "norm2.scale", "norm2.shift"]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTModel({**TINY, **overrides}).eval()


def ids(batch=2, tokens=5, seed=1, vocab=TINY["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, tokens), generator=g)


def test_state_dict_keys_are_the_books():
    expected = {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift", "out_head.weight"}
    expected |= {f"trf_blocks.{i}.{k}" for i in range(TINY["n_layers"]) for k in BOOK_BLOCK_KEYS}
    assert set(tiny_model().state_dict()) == expected


def test_state_dict_keys_with_qkv_bias():
    keys = set(tiny_model(qkv_bias=True).state_dict())
    for i in range(TINY["n_layers"]):
        for name in ("W_query", "W_key", "W_value"):
            assert f"trf_blocks.{i}.att.{name}.bias" in keys


def test_shapes_of_state_dict():
    sd = tiny_model().state_dict()
    V, C, d = TINY["vocab_size"], TINY["context_length"], TINY["emb_dim"]
    assert sd["tok_emb.weight"].shape == (V, d)
    assert sd["pos_emb.weight"].shape == (C, d)
    assert sd["out_head.weight"].shape == (V, d)
    assert sd["trf_blocks.0.att.mask"].shape == (C, C)
    assert sd["trf_blocks.0.ff.layers.0.weight"].shape == (4 * d, d)


def test_block_attributes():
    block = TransformerBlock(TINY)
    for name in ("att", "ff", "norm1", "norm2", "drop_shortcut"):
        assert hasattr(block, name)
    assert isinstance(block.drop_shortcut, torch.nn.Dropout)
    model = GPTModel(TINY)
    assert isinstance(model.trf_blocks, torch.nn.Sequential) and len(model.trf_blocks) == TINY["n_layers"]
    assert model.out_head.bias is None


def test_strict_load_round_trip():
    a = tiny_model(seed=0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = tiny_model(seed=1)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = ids()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_strict_load_rejects_renamed_key():
    sd = tiny_model().state_dict()
    sd["trf_blocks.0.norm1.weight"] = sd.pop("trf_blocks.0.norm1.scale")
    with pytest.raises(RuntimeError):
        tiny_model().load_state_dict(sd, strict=True)


@pytest.mark.parametrize("change, message", [
    ({"emb_dim": 15}, "not divisible by n_heads"),
    ({"n_layers": 0}, "n_layers=0 must be a positive int"),
    ({"vocab_size": -3}, "vocab_size=-3"),
    ({"context_length": 2.5}, "context_length=2.5"),
    ({"n_heads": True}, "n_heads=True"),
    ({"drop_rate": 1.0}, "drop_rate=1.0"),
    ({"drop_rate": -0.1}, "drop_rate=-0.1"),
    ({"qkv_bias": "no"}, "qkv_bias"),
])
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GPTModel({**TINY, **change})


@pytest.mark.parametrize("key", list(TINY))
def test_missing_key_is_named(key):
    cfg = {k: v for k, v in TINY.items() if k != key}
    with pytest.raises(ValueError, match=f"'{key}'"):
        validate_config(cfg)


def test_config_not_a_dict():
    with pytest.raises(TypeError):
        GPTModel([("emb_dim", 16)])


def test_gpt2_config_sizes():
    assert gpt2_config("gpt2-small (124M)") == GPT_CONFIG_124M
    assert gpt2_config("124M") == GPT_CONFIG_124M
    expected = {"355M": (1024, 24, 16), "774M": (1280, 36, 20), "1558M": (1600, 48, 25)}
    for short, (emb, layers, heads) in expected.items():
        cfg = gpt2_config(short)
        assert (cfg["emb_dim"], cfg["n_layers"], cfg["n_heads"]) == (emb, layers, heads)
        assert cfg["vocab_size"] == 50257 and cfg["context_length"] == 1024
    assert gpt2_config("gpt2-medium", qkv_bias=True)["qkv_bias"] is True
    assert len(GPT2_SIZES) == 4
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        gpt2_config("gpt2-huge")


def test_gpt2_size_name_is_the_one_table_of_size_names():
    for key in GPT2_SIZES:
        model_name, count = key.split(" ")
        assert gpt2_size_name(key) == gpt2_size_name(model_name) == gpt2_size_name(count.strip("()")) == key
    assert gpt2_size_name("gpt2") == "gpt2-small (124M)"             # the Hugging Face Hub's name
    with pytest.raises(ValueError) as err:
        gpt2_size_name("7B")
    assert all(size in str(err.value) for size in ("124M", "355M", "774M", "1558M"))


def test_forward_shape():
    x = ids(batch=3, tokens=TINY["context_length"])
    with torch.no_grad():
        assert tiny_model()(x).shape == (3, TINY["context_length"], TINY["vocab_size"])


def test_forward_bad_inputs():
    model = tiny_model()
    V, C = TINY["vocab_size"], TINY["context_length"]
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match=f"crop it to the last {C} tokens"):
        model(torch.zeros(1, C + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_eval_is_deterministic_and_train_is_not():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_sdpa_path_gives_same_logits():
    model = tiny_model()
    x = ids(tokens=TINY["context_length"])
    with torch.no_grad():
        slow = model.set_sdpa(False)(x)
        fast = model.set_sdpa(True)(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    built_fast = GPTModel(TINY, use_sdpa=True).eval()
    assert all(b.att.use_sdpa for b in built_fast.trf_blocks)
    with torch.no_grad():
        torch.testing.assert_close(built_fast(x), slow, atol=1e-5, rtol=0)


def test_generate_greedy_matches_manual_argmax():
    model = tiny_model()
    start = ids(batch=2, tokens=3)
    out = generate_text_simple(model, start, max_new_tokens=4, context_size=TINY["context_length"])
    assert out.shape == (2, 7) and torch.equal(out[:, :3], start)
    idx = start
    with torch.no_grad():
        for _ in range(4):
            nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
    assert torch.equal(out, idx)


def test_generate_crops_long_context():
    model = tiny_model()
    C = TINY["context_length"]
    long_prompt = ids(batch=1, tokens=3 * C)                 # longer than the model could take
    out = generate_text_simple(model, long_prompt, max_new_tokens=5, context_size=C)
    assert out.shape == (1, 3 * C + 5)
    alone = generate_text_simple(model, long_prompt[:, -C:], max_new_tokens=5, context_size=C)
    assert torch.equal(out[:, -5:], alone[:, -5:])           # only the last C tokens mattered
    # a smaller context_size uses fewer tokens: changing earlier tokens changes nothing
    altered = long_prompt.clone()
    altered[:, :-2] = (altered[:, :-2] + 1) % TINY["vocab_size"]
    a = generate_text_simple(model, long_prompt, 1, context_size=2)
    b = generate_text_simple(model, altered, 1, context_size=2)
    assert torch.equal(a[:, -1], b[:, -1])


def test_generate_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError):
        generate_text_simple(model, torch.tensor([1, 2]), 2, 4)
    with pytest.raises(ValueError, match="context_size"):
        generate_text_simple(model, torch.tensor([[1, 2]]), 2, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text_simple(model, torch.tensor([[1, 2]]), -1, 4)
    out = generate_text_simple(model, torch.tensor([[1, 2]]), 0, 4)
    assert out.tolist() == [[1, 2]]


@pytest.mark.parametrize("overrides", [
    {}, {"qkv_bias": True}, {"n_layers": 1}, {"emb_dim": 24, "n_heads": 3, "n_layers": 3},
    {"vocab_size": 11, "context_length": 3, "emb_dim": 4, "n_heads": 4, "n_layers": 5},
])
def test_parameter_count_from_config(overrides):
    cfg = {**TINY, **overrides}
    counts = count_parameters_from_config(cfg)
    assert counts["total"] == count_parameters(GPTModel(cfg))
    assert counts["total_tied"] == counts["total"] - cfg["vocab_size"] * cfg["emb_dim"]


def test_parameter_count_gpt2_sizes_on_meta_device():
    for name in GPT2_SIZES:
        cfg = gpt2_config(name)
        with torch.device("meta"):
            model = GPTModel(cfg)
        assert count_parameters(model) == count_parameters_from_config(cfg)["total"]
    c = count_parameters_from_config(GPT_CONFIG_124M)
    assert c["total"] == 163_009_536 and c["total_tied"] == 124_412_160
    assert round(c["total"] * 4 / 1024**2, 2) == 621.83


def test_tied_count_matches_huggingface_gpt2():
    transformers = pytest.importorskip("transformers")
    for name, (emb, layers, heads) in {"124M": (768, 12, 12), "355M": (1024, 24, 16)}.items():
        hf_cfg = transformers.GPT2Config(n_embd=emb, n_layer=layers, n_head=heads)
        with torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(hf_cfg)
        ours = count_parameters_from_config(gpt2_config(name, qkv_bias=True))["total_tied"]
        assert ours == sum(p.numel() for p in hf.parameters()), name


def test_count_parameters_counts_shared_once():
    model = tiny_model()
    untied = count_parameters(model)
    model.out_head.weight = model.tok_emb.weight
    assert count_parameters(model) == untied - TINY["vocab_size"] * TINY["emb_dim"]
