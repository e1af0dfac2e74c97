"""Appendix F: `load_base_model`, the starting point of parts 22-27 (GPT-2 where it can be had, else the course's
own base model, pretrained once and cached). Uses the smoke recipe, which trains in seconds."""
import math
import os
import socket

import pytest
import torch

from conftest import SHARED_DATA
from llm_from_scratch.checkpoint import CheckpointError
from llm_from_scratch.base_model import (COURSE_BASE_RECIPES, BaseModel, _recipe_fingerprint, code_digest,
                                         course_base_model, course_base_model_path, load_base_model, lr_at,
                                         source_digest)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smoke_env(tmp_path_factory):
    "Smoke profile, an empty cache of our own, the mirrored texts, no Hugging Face downloads."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FROM_SCRATCH_PROFILE", "smoke")
        mp.setenv("LLM_FROM_SCRATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("LLM_FROM_SCRATCH_DATA", os.environ.get("LLM_FROM_SCRATCH_DATA") or str(SHARED_DATA))
        import huggingface_hub.constants as hc
        mp.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
        yield mp


@pytest.fixture(scope="module")
def built(smoke_env):
    "The smoke base model, trained once for this module."
    return course_base_model(device="cpu", progress=False)


def test_the_course_model_is_built_cached_and_named_not_gpt2(built):
    assert isinstance(built, BaseModel) and not built.is_gpt2
    assert "not GPT-2" in built.name and "GPT-2 124M" not in built.name
    r = built.report
    assert r["source"].startswith("pretrained just now")
    assert r["params"] == sum(p.numel() for p in built.model.parameters())
    assert r["val_loss"] < math.log(50257)                     # better than a uniform guess over the vocabulary
    assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-3)
    assert r["train_seconds"] > 0 and r["steps"] == COURSE_BASE_RECIPES["smoke"]["steps"]
    assert len(r["history"]["val_loss"]) == len(r["history"]["step"]) >= 2
    assert course_base_model_path().is_file()
    assert not built.model.training                             # handed over in eval mode


def test_a_second_call_loads_the_cache_with_identical_weights(built):
    again = course_base_model(device="cpu", progress=False)
    assert again.report["source"].startswith("loaded from the cache")
    assert again.report["val_loss"] == built.report["val_loss"]  # the report travels inside the file
    for (k, a), (_, b) in zip(built.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_offline_load_base_model_falls_back_and_says_why(built, capsys):
    base = load_base_model("124M", device="cpu", progress=False)
    out = capsys.readouterr().out
    assert not base.is_gpt2 and "not GPT-2" in out and "GPT-2 124M unavailable" in out
    assert "HF_HUB_OFFLINE" in base.report["why_not_gpt2"]
    assert torch.equal(base.model.out_head.weight, built.model.out_head.weight)


def test_course_asked_for_directly_does_not_look_for_gpt2(built, monkeypatch, capsys):
    import llm_from_scratch.base_model as g
    monkeypatch.setattr(g, "load_gpt2", lambda *a, **k: pytest.fail("load_gpt2 called for model_size='course'"))
    base = load_base_model("course", device="cpu", progress=False)
    assert not base.is_gpt2 and "why_not_gpt2" not in base.report
    assert "unavailable" not in capsys.readouterr().out


def test_gpt2_is_used_wherever_its_weights_can_be_had(smoke_env, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    hf.save_pretrained(tmp_path)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",                    # a filled Hugging Face cache
                        lambda repo_id, filename, **kw: str(tmp_path / filename))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    base = load_base_model("124M", device="cpu")
    assert base.is_gpt2 and base.name == "GPT-2 124M (OpenAI's pretrained weights)"
    assert "base model: GPT-2 124M" in capsys.readouterr().out
    ids = torch.tensor([[464, 3290, 318, 257]])
    with torch.no_grad():
        assert (hf(ids).logits - base.model(ids)).abs().max().item() < 1e-4


def test_unknown_size_fails_before_anything_is_built(smoke_env, monkeypatch):
    import llm_from_scratch.base_model as g
    monkeypatch.setattr(g, "course_base_model", lambda **k: pytest.fail("built a model for a bad size"))
    with pytest.raises(ValueError, match="124M"):
        load_base_model("7B")


def test_a_corrupt_cache_is_reported_and_left_alone(built):
    path = course_base_model_path()
    good = path.read_bytes()
    try:
        path.write_bytes(good[: len(good) // 2])                 # what a disk error might leave
        with pytest.raises(CheckpointError, match="rebuild=True") as err:
            course_base_model(device="cpu", progress=False)
        assert str(path) in str(err.value)
        assert path.read_bytes() == good[: len(good) // 2]       # nothing overwritten behind the user's back
    finally:
        path.write_bytes(good)


def test_rebuild_trains_again_and_is_deterministic(built):
    again = course_base_model(device="cpu", progress=False, rebuild=True)
    assert again.report["source"].startswith("pretrained just now")
    assert again.report["history"]["val_loss"] == built.report["history"]["val_loss"]   # same seed, same run


def test_the_cache_name_follows_the_recipe(smoke_env):
    full, smoke = course_base_model_path("full"), course_base_model_path("smoke")
    assert full != smoke and full.parent == smoke.parent
    changed = {**COURSE_BASE_RECIPES["full"], "steps": 601}
    assert _recipe_fingerprint(changed) != _recipe_fingerprint(COURSE_BASE_RECIPES["full"])
    with pytest.raises(ValueError, match="smoke"):
        course_base_model_path("huge")


def test_the_cache_name_follows_the_training_texts(smoke_env, monkeypatch):
    import dataclasses
    from llm_from_scratch import download
    before = _recipe_fingerprint(COURSE_BASE_RECIPES["full"])
    spec = download.REGISTRY["the-verdict.txt"]
    monkeypatch.setitem(download.REGISTRY, "the-verdict.txt", dataclasses.replace(spec, sha256="0" * 64))
    assert _recipe_fingerprint(COURSE_BASE_RECIPES["full"]) != before


def test_the_cache_name_follows_the_training_code(smoke_env, monkeypatch):
    import llm_from_scratch.base_model as bm
    before = _recipe_fingerprint(COURSE_BASE_RECIPES["full"])
    code = bm._training_code()
    assert bm.pretrain_base_model in code and any(getattr(c, "__name__", "") == "GPTModel" for c in code)
    monkeypatch.setattr(bm, "_training_code", lambda: code + [source_digest])    # one more function in the recipe
    assert _recipe_fingerprint(COURSE_BASE_RECIPES["full"]) != before


def test_code_digest_ignores_comments_and_docstrings_but_not_code():
    a = 'def f(x):\n    "Doc."\n    return x + 1   # note\n'
    b = 'def f(x):\n    \"\"\"Other doc.\"\"\"\n    return x+1\n'
    c = 'def f(x):\n    "Doc."\n    return x + 2\n'
    d = 'def f(x):\n    "Only a docstring."\n'
    assert source_digest(a) == source_digest(b) != source_digest(c)
    assert source_digest(d) == source_digest('def f(x):\n    pass\n')
    assert code_digest(lr_at) == code_digest(lr_at) and code_digest(lr_at) != code_digest(course_base_model)


def test_learning_rate_schedule_warms_up_then_decays_to_min_lr():
    kw = dict(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and lr_at(500, **kw) == pytest.approx(1e-4)
