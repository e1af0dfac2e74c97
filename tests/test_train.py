"""Part 22 (training loops, exact resume) and appendix C (checkpoints): tiny configs, CPU, a few seconds each."""
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from llm_from_scratch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from llm_from_scratch.core import set_seed
from llm_from_scratch.model import GPTModel
from llm_from_scratch.train import epoch_batches, evaluate_model, train_model, train_model_simple

CFG = {"vocab_size": 97, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.1, "qkv_bias": False}


def _loaders(n_windows=12, shuffle=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG["vocab_size"], (n_windows, CFG["context_length"] + 1), generator=g)
    train = DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=2, shuffle=shuffle, drop_last=True)
    val = DataLoader(TensorDataset(ids[:4, :-1], ids[:4, 1:]), batch_size=2, shuffle=False)
    return train, val


def _fresh(seed=123, cfg=CFG):
    set_seed(seed)
    model = GPTModel(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _run(**kw):
    train, val = _loaders()
    model, opt = _fresh(kw.pop("seed", 123))
    return train_model(model, train, val, opt, "cpu", kw.pop("num_epochs", 3), eval_freq=3, eval_iter=2,
                       progress=False, **kw)


def test_training_is_reproducible_with_a_seed():
    a, b = _run(), _run()
    assert a.step_losses == b.step_losses and a.val_losses == b.val_losses
    assert len(a.step_losses) == 3 * 6


def test_train_model_simple_is_reproducible_and_returns_the_books_triple(capsys):
    results = []
    for _ in range(2):
        set_seed(5)
        train, val = _loaders()
        model, opt = _fresh(5)
        results.append(train_model_simple(model, train, val, opt, "cpu", 2, eval_freq=4, eval_iter=1,
                                          start_context="ab", tokenizer=_CharTok(), progress=False))
    assert results[0] == results[1]
    train_losses, val_losses, tokens = results[0]
    assert len(train_losses) == len(val_losses) == len(tokens) == 3          # steps 0, 4, 8 of 12
    assert tokens == [2 * 16, 5 * 2 * 16, 9 * 2 * 16]
    assert "Ep 1 (Step 000000)" in capsys.readouterr().out


class _CharTok:
    "A toy tokenizer over the tiny vocabulary, enough for generate_and_print_sample."
    def encode(self, text, allowed_special=None):
        return [ord(c) % CFG["vocab_size"] for c in text]

    def decode(self, ids):
        return "".join(chr(32 + i % 90) for i in ids)


class _Crash(Exception):
    pass


def _crash_in_step(monkeypatch, n):
    "Make the n-th (from 0) call of calc_loss_batch inside train_model raise, as if the process died there."
    import llm_from_scratch.train as train_module
    real, calls = train_module.calc_loss_batch, [0]

    def crashing(*a, **k):
        if calls[0] == n:
            raise _Crash(f"simulated crash in step {n}")
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(train_module, "calc_loss_batch", crashing)
    return lambda: monkeypatch.setattr(train_module, "calc_loss_batch", real)


def test_resume_from_a_checkpoint_mid_run_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full = _run()
    ckpt = tmp_path / "run.pth"
    undo = _crash_in_step(monkeypatch, 10)
    with pytest.raises(_Crash):
        _run(checkpoint_path=ckpt, checkpoint_every=4, num_epochs=3)          # dies inside step 10
    undo()
    state = torch.load(ckpt, weights_only=True)["extra"]["train_state"]
    assert state["global_step"] == 7 and state["epoch"] == 1 and state["batch"] == 2   # mid-epoch checkpoint
    resumed = _run(seed=999, resume_from=ckpt)                                # different RNG state before resuming
    assert resumed.step_losses == full.step_losses                            # exact, not close
    assert resumed.val_losses == full.val_losses and resumed.train_losses == full.train_losses
    assert resumed.eval_steps == full.eval_steps and resumed.track_tokens_seen == full.track_tokens_seen


def test_resume_refuses_a_changed_data_plan(tmp_path):
    ckpt = tmp_path / "run.pth"
    _run(checkpoint_path=ckpt, checkpoint_every=4, max_steps=5)
    with pytest.raises(ValueError, match="shuffle_seed"):
        _run(resume_from=ckpt, shuffle_seed=7)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_batches(10, 3, 2, shuffle=True, seed=1, drop_last=True)
    torch.rand(100)                                                             # global RNG use does not matter
    assert a == epoch_batches(10, 3, 2, shuffle=True, seed=1, drop_last=True)
    assert len(a) == 3 and all(len(b) == 3 for b in a)
    assert epoch_batches(10, 3, 0, shuffle=False, seed=1, drop_last=False)[-1] == [9]


def test_checkpoint_round_trip_model_and_optimizer(tmp_path):
    model, opt = _fresh()
    train, val = _loaders()
    train_model(model, train, val, opt, "cpu", 1, eval_freq=100, eval_iter=1, progress=False)
    path = save_checkpoint(tmp_path / "ck.pth", model, opt, epoch=1, note="hi")
    model2, opt2 = _fresh(seed=7)
    ckpt = load_checkpoint(path, model2, opt2)
    assert ckpt["extra"] == {"epoch": 1, "note": "hi"} and ckpt["config"] == CFG
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert os.listdir(tmp_path) == ["ck.pth"]


def test_checkpoint_restores_rng_when_asked(tmp_path):
    model, _ = _fresh()
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "ck.pth", model)
    expected = torch.rand(5)
    torch.manual_seed(99)
    load_checkpoint(tmp_path / "ck.pth", model, restore_rng=True)
    assert torch.equal(torch.rand(5), expected)


def test_save_refuses_objects_that_weights_only_cannot_load(tmp_path):
    model, _ = _fresh()
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "ck.pth", model, when=object())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
def test_atomic_write_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch, where):
    model, _ = _fresh()
    path = save_checkpoint(tmp_path / "ck.pth", model, version=1)
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")          # some bytes reach the temp file, then the crash
        raise OSError("disk full (simulated)")

    def broken_replace(src, dst):
        raise OSError("rename failed (simulated)")

    if where == "torch.save":
        monkeypatch.setattr(torch, "save", broken_save)
    else:
        monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, model, version=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before                      # the old checkpoint is untouched
    assert os.listdir(tmp_path) == ["ck.pth"]               # and no temporary file is left
    assert load_checkpoint(path, model)["extra"]["version"] == 1


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    model, opt = _fresh()
    path = save_checkpoint(tmp_path / "ck.pth", model, opt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint \(truncated or corrupt\?\)"):
        load_checkpoint(path, model)


def test_random_bytes_give_a_clear_error(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path, _fresh()[0])


def test_missing_file_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pth", _fresh()[0])


def test_checkpoint_from_a_different_config_names_the_tensor(tmp_path):
    small, _ = _fresh()
    path = save_checkpoint(tmp_path / "ck.pth", small)
    wide, _ = _fresh(cfg={**CFG, "emb_dim": 32})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, wide)
    msg = str(err.value)
    assert "tok_emb.weight" in msg and "(97, 16)" in msg and "(97, 32)" in msg and "emb_dim=16" in msg
    deep, _ = _fresh(cfg={**CFG, "n_layers": 3})
    with pytest.raises(CheckpointError, match=r"missing .*trf_blocks\.2\."):
        load_checkpoint(path, deep)


def test_a_plain_state_dict_is_not_mistaken_for_a_checkpoint(tmp_path):
    model, _ = _fresh()
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CheckpointError, match="load_gpt2_pth"):
        load_checkpoint(tmp_path / "sd.pth", model)


def test_loss_falls_on_repeated_data():
    model, _ = _fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, CFG["vocab_size"], (2, CFG["context_length"] + 1), generator=torch.Generator().manual_seed(1))
    train = DataLoader(TensorDataset(ids[:, :-1].repeat(4, 1), ids[:, 1:].repeat(4, 1)), batch_size=2, shuffle=True)
    hist = train_model(model, train, train, opt, "cpu", 5, eval_freq=4, eval_iter=1, progress=False)
    assert hist.step_losses[-1] < hist.step_losses[0] - 1.0
    assert hist.train_losses[-1] < hist.train_losses[0]


def test_evaluate_model_restores_train_mode_and_records_no_gradients():
    model, _ = _fresh()
    train, val = _loaders()
    model.train()
    train_loss, val_loss = evaluate_model(model, train, val, "cpu", eval_iter=2)
    assert model.training and isinstance(train_loss, float) and isinstance(val_loss, float)
    assert all(p.grad is None for p in model.parameters())
    ordered, _ = _loaders(shuffle=False)
    assert evaluate_model(model, ordered, val, "cpu", 1) == evaluate_model(model, ordered, val, "cpu", 1)  # no dropout


def test_bad_loop_arguments_are_rejected(tmp_path):
    train, val = _loaders()
    model, opt = _fresh()
    with pytest.raises(ValueError, match="eval_freq"):
        train_model(model, train, val, opt, "cpu", 1, eval_freq=0, eval_iter=1)
    with pytest.raises(ValueError, match="checkpoint_path"):
        train_model(model, train, val, opt, "cpu", 1, eval_freq=1, eval_iter=1, checkpoint_every=2)


def test_max_steps_writes_a_checkpoint_at_the_stop_and_resume_continues_exactly(tmp_path):
    full = _run()
    ckpt = tmp_path / "run.pth"
    part = _run(checkpoint_path=ckpt, checkpoint_every=4, max_steps=10)       # steps 0..9, last periodic save after 7
    assert len(part.step_losses) == 10 and part.step_losses == full.step_losses[:10]
    state = torch.load(ckpt, weights_only=True)["extra"]["train_state"]
    assert state["global_step"] == 9 and (state["epoch"], state["batch"]) == (1, 4)   # nothing lost at the stop
    assert state["history"]["step_losses"] == part.step_losses
    resumed = _run(seed=999, resume_from=ckpt)
    assert resumed.step_losses == full.step_losses and resumed.val_losses == full.val_losses
    assert resumed.eval_steps == full.eval_steps and resumed.track_tokens_seen == full.track_tokens_seen


def test_max_steps_at_an_epoch_boundary_and_in_two_hops(tmp_path):
    full = _run()
    ckpt = tmp_path / "run.pth"
    _run(checkpoint_path=ckpt, max_steps=6)                                   # exactly one epoch, no checkpoint_every
    state = torch.load(ckpt, weights_only=True)["extra"]["train_state"]
    assert state["global_step"] == 5 and (state["epoch"], state["batch"]) == (1, 0)
    mid = _run(seed=5, resume_from=ckpt, checkpoint_path=ckpt, max_steps=13)  # a second hop, same file
    assert mid.step_losses == full.step_losses[:13]
    assert torch.load(ckpt, weights_only=True)["extra"]["train_state"]["global_step"] == 12
    resumed = _run(seed=999, resume_from=ckpt)
    assert resumed.step_losses == full.step_losses and resumed.val_losses == full.val_losses


def test_max_steps_when_the_last_save_was_that_step_writes_nothing_new(tmp_path, monkeypatch):
    import llm_from_scratch.train as train_module
    writes = []
    real = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda *a, **k: writes.append(1) or real(*a, **k))
    _run(checkpoint_path=tmp_path / "run.pth", checkpoint_every=4, max_steps=8)   # saves after steps 3 and 7 only
    assert len(writes) == 2
    assert torch.load(tmp_path / "run.pth", weights_only=True)["extra"]["train_state"]["global_step"] == 7


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_bad_max_steps_is_rejected(bad):
    with pytest.raises(ValueError, match="max_steps"):
        _run(max_steps=bad)
