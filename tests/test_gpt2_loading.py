"""Appendix D: loading GPT-2 weights written by others (Hugging Face safetensors, the book's .pth), offline."""
import datetime
import json
import socket
import sys
import time

import pytest
import torch

from llm_from_scratch.model import GPTModel, gpt2_size_name
from llm_from_scratch.checkpoint import CheckpointError
from llm_from_scratch.gpt2 import (BOOK_GPT2_FILES, GPT2_HF_REPOS, PretrainedWeightsUnavailableError, gpt2_config_from_hf,
                                   load_gpt2, load_gpt2_from_dir, load_gpt2_pth, load_hf_gpt2_weights, save_gpt2_to_dir)

transformers = pytest.importorskip("transformers")

SMALL = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**SMALL)).eval()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf_model.save_pretrained(folder)
    return folder


IDS = torch.tensor([[464, 3290, 318, 257, 1332, 13, 6288, 1110, 11, 290, 50256, 1169]])


def test_loaded_model_matches_transformers_logits(hf_model, hf_dir):
    ours = load_gpt2_from_dir(hf_dir, device="cpu")
    assert not ours.training
    assert ours.cfg == {"vocab_size": 50257, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                        "drop_rate": 0.1, "qkv_bias": True}
    with torch.no_grad():
        diff = (hf_model(IDS).logits - ours(IDS)).abs().max().item()
    assert diff < 1e-4


def test_prefixed_and_unprefixed_keys_and_old_mask_buffers_load(hf_model):
    sd = hf_model.state_dict()
    plain = {k.removeprefix("transformer."): v for k, v in sd.items()}     # the Hub files' own naming
    plain["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)                    # older files carry the mask buffer
    cfg = gpt2_config_from_hf(SMALL)
    a = load_hf_gpt2_weights(GPTModel(cfg).eval(), sd)
    b = load_hf_gpt2_weights(GPTModel(cfg).eval(), plain)
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


def test_one_wrong_shaped_tensor_is_named(hf_model):
    sd = dict(hf_model.state_dict())
    sd["transformer.h.1.attn.c_proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError) as err:
        load_hf_gpt2_weights(GPTModel(gpt2_config_from_hf(SMALL)), sd)
    msg = str(err.value)
    assert "h.1.attn.c_proj.weight" in msg and "(64, 32)" in msg and "(64, 64)" in msg


def test_missing_and_leftover_tensors_are_named(hf_model):
    sd = dict(hf_model.state_dict())
    del sd["transformer.h.1.ln_2.bias"]
    with pytest.raises(CheckpointError, match=r"h\.1\.ln_2\.bias"):
        load_hf_gpt2_weights(GPTModel(gpt2_config_from_hf(SMALL)), sd)
    one_layer = gpt2_config_from_hf({**SMALL, "n_layer": 1})
    with pytest.raises(CheckpointError, match=r"h\.1\."):
        load_hf_gpt2_weights(GPTModel(one_layer), hf_model.state_dict())


def test_unsupported_gpt2_variants_are_refused():
    with pytest.raises(ValueError, match="activation_function"):
        gpt2_config_from_hf({**SMALL, "activation_function": "relu"})
    with pytest.raises(ValueError, match="n_embd"):
        gpt2_config_from_hf({"n_layer": 2})


def test_folder_without_config_or_weights(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2_from_dir(tmp_path)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_gpt2_from_dir(tmp_path)
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gpt2_from_dir(tmp_path)


def test_unknown_model_size_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        load_gpt2("7B")
    assert all(size in str(err.value) for size in ("124M", "355M", "774M", "1558M"))


def test_size_names_map_to_the_hub_repositories():
    repo = lambda name: GPT2_HF_REPOS[gpt2_size_name(name)]
    assert repo("124M") == repo("gpt2-small (124M)") == repo("gpt2") == "openai-community/gpt2"
    assert repo("gpt2-medium") == "openai-community/gpt2-medium"
    assert repo("774M") == "openai-community/gpt2-large"
    assert repo("gpt2-xl (1558M)") == "openai-community/gpt2-xl"
    assert BOOK_GPT2_FILES[gpt2_size_name("355M")] == "gpt2-medium-355M.pth"


def _fake_hub(monkeypatch, hf_dir, cached=True):
    "Replace hf_hub_download by a fake that serves hf_dir's files, from the 'cache' only if `cached`; returns its call log."
    import huggingface_hub
    calls = []

    def fake(repo_id, filename, cache_dir=None, local_files_only=False, **kw):
        calls.append((repo_id, filename, local_files_only))
        if local_files_only and not cached:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(hf_dir / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls


@pytest.mark.parametrize("name", ["124M", "gpt2", "gpt2-small", "gpt2-small (124M)"])
def test_a_cached_copy_loads_without_the_network(monkeypatch, hf_dir, hf_model, name):
    calls = _fake_hub(monkeypatch, hf_dir)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("load_gpt2 probed the network"))
    ours = load_gpt2(name, device="cpu")
    assert calls == [("openai-community/gpt2", "config.json", True), ("openai-community/gpt2", "model.safetensors", True)]
    with torch.no_grad():
        assert (hf_model(IDS).logits - ours(IDS)).abs().max().item() < 1e-4


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    "Offline mode, an empty Hugging Face cache, and sockets that refuse to connect."
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    import huggingface_hub.constants as hc              # constants are read at import: patch them too
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hc, "HF_HOME", str(hf_home), raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hf_home / "hub"), raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return hf_home


@pytest.mark.parametrize("source", ["hf", "book"])
def test_offline_with_nothing_cached_says_what_to_do(no_network, tmp_path, source):
    with pytest.raises(PretrainedWeightsUnavailableError) as err:
        load_gpt2("124M", models_dir=tmp_path / "empty", source=source)
    msg = str(err.value)
    assert "offline" in msg and ("load_gpt2_from_dir" in msg or "load_gpt2_pth" in msg)
    assert "openai-community/gpt2" in msg or "rasbt/gpt2-from-scratch-pytorch" in msg


def test_unreachable_hub_fails_fast_without_offline_mode(no_network, monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailableError) as err:
        load_gpt2("124M", models_dir=tmp_path / "empty", timeout=1.0)
    assert time.perf_counter() - start < 5.0                       # no minute of retries
    assert "cannot be reached" in err.value.reason and "offline" in str(err.value)
    assert "load_gpt2_from_dir('gpt2-124M')" in str(err.value)


def test_missing_huggingface_hub_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        load_gpt2("124M")


def test_book_format_pth_loads_strictly(tmp_path, hf_dir):
    ours = load_gpt2_from_dir(hf_dir, device="cpu")
    path = tmp_path / "gpt2-tiny.pth"
    torch.save(ours.state_dict(), path)
    again = load_gpt2_pth(path, ours.cfg, device="cpu")
    assert not again.training
    with torch.no_grad():
        assert torch.equal(again(IDS), ours(IDS))


def test_book_format_pth_config_is_read_off_the_shapes_for_gpt2_sizes(tmp_path):
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 768, "n_heads": 12, "n_layers": 1,
           "drop_rate": 0.1, "qkv_bias": True}
    torch.manual_seed(0)
    model = GPTModel(cfg)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    assert load_gpt2_pth(tmp_path / "m.pth", device="cpu").cfg == cfg


def test_book_format_pth_with_a_missing_key_names_it(tmp_path, hf_dir):
    ours = load_gpt2_from_dir(hf_dir, device="cpu")
    sd = ours.state_dict()
    del sd["trf_blocks.0.att.W_key.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing .*trf_blocks\.0\.att\.W_key\.bias"):
        load_gpt2_pth(tmp_path / "bad.pth", ours.cfg)
    sd = ours.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected .*extra\.weight"):
        load_gpt2_pth(tmp_path / "extra.pth", ours.cfg)


def test_pth_holding_arbitrary_objects_is_refused(tmp_path):
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "x": datetime.timedelta(days=1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_gpt2_pth(tmp_path / "evil.pth")


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_save_gpt2_to_dir_is_read_by_transformers_and_by_our_loader(tmp_path, qkv_bias):
    cfg = {"vocab_size": 50257, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.1, "qkv_bias": qkv_bias}
    torch.manual_seed(1)
    ours = GPTModel(cfg).eval()                                      # untied out_head, as the book's model
    save_gpt2_to_dir(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    back = load_gpt2_from_dir(tmp_path, device="cpu")
    assert back.cfg == {**cfg, "qkv_bias": True}                     # zero biases where the model had none
    with torch.no_grad():
        want = ours(IDS)
        assert (theirs(IDS).logits - want).abs().max().item() < 1e-4
        assert torch.equal(back(IDS), want)


def test_save_gpt2_to_dir_round_trips_a_transformers_model(tmp_path, hf_model, hf_dir):
    ours = load_gpt2_from_dir(hf_dir, device="cpu")
    save_gpt2_to_dir(ours, tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (again(IDS).logits - hf_model(IDS).logits).abs().max().item() < 1e-4


def test_save_gpt2_to_dir_keeps_a_bfloat16_model_bfloat16(tmp_path):
    "The zero biases written for a model without qkv_bias take the weights' dtype: no float32 tensor in a bf16 file."
    from safetensors.torch import load_file
    cfg = {"vocab_size": 100, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
           "qkv_bias": False}
    ours = GPTModel(cfg).to(torch.bfloat16)
    save_gpt2_to_dir(ours, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert not tensors["transformer.h.1.attn.c_attn.bias"].any()
