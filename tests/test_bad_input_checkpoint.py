"""Appendix C (module checkpoint) under bad input: corrupt, cut and foreign files, the wrong model, unwritable targets.

Every test checks the message (what is wrong, which file or tensor, what to do) and that no file the user had
changed (sha256 before and after); a failed load must not change the model either.
"""
import hashlib
import io
import os
import struct
import zipfile

import pytest
import torch

import llm_from_scratch.checkpoint as checkpoint
from llm_from_scratch.checkpoint import (CHECKPOINT_FORMAT_V1, CheckpointError, content_digest, load_checkpoint,
                                         read_weights_only, save_checkpoint, verify_digest)
from llm_from_scratch.core import set_seed
from llm_from_scratch.model import GPTModel

CFG = {"vocab_size": 97, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}


def _model(seed=0, cfg=CFG):
    set_seed(seed)
    return GPTModel(cfg)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture
def saved(tmp_path):
    "A good checkpoint with optimizer state: (path, model, optimizer)."
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    return save_checkpoint(tmp_path / "run.pth", model, opt, step=1), model, opt


def _member_span(data: bytes, name_part: str):
    "(start, size) of the stored bytes of the largest zip member whose name contains name_part."
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = max((i for i in zf.infolist() if name_part in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED                       # torch.save stores tensors uncompressed
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip(data: bytes, at: int, n: int = 16) -> bytes:
    out = bytearray(data)
    out[at:at + n] = bytes(b ^ 0xFF for b in out[at:at + n])
    return bytes(out)


# ---------------------------------------------------------------- corrupt bytes

def test_flipped_bytes_in_tensor_data_are_refused_naming_file_and_tensor(saved, tmp_path):
    path, _, _ = saved
    good_before = _sha(path)
    data = path.read_bytes()
    start, size = _member_span(data, "/data/")
    bad = tmp_path / "flipped.pth"
    bad.write_bytes(_flip(data, start + size // 2))
    before = _sha(bad)
    plain = torch.load(bad, weights_only=True)                             # plain torch.load does not notice
    assert plain["format"] == checkpoint.CHECKPOINT_FORMAT
    model = _model(seed=1)
    weights = _weights(model)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad, model)
    msg = str(err.value)
    assert str(bad) in msg and "is corrupt" in msg and "SHA-256 digest" in msg
    assert "changed: " in msg and ("model_state_dict." in msg or "optimizer_state_dict." in msg)
    assert "Use another copy or an earlier checkpoint" in msg
    assert _unchanged(model, weights) and _sha(bad) == before and _sha(path) == good_before


def test_flipped_bytes_in_the_optimizer_state_name_the_optimizer_tensor(saved, tmp_path):
    path, model, opt = saved
    data = path.read_bytes()
    # find the member that holds exp_avg of the token embedding: its bytes equal that tensor's bytes
    target = opt.state[model.tok_emb.weight]["exp_avg"].contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(target)
    assert at > 0
    bad = tmp_path / "bad_opt.pth"
    bad.write_bytes(_flip(data, at + len(target) // 2, 8))
    with pytest.raises(CheckpointError, match=r"changed: optimizer_state_dict\.state\[0\]\.exp_avg"):
        read_weights_only(bad)


def test_an_edited_value_outside_the_tensors_is_caught(saved, tmp_path):
    path, _, _ = saved
    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"]["step"] = 2                                              # edited after writing, digest kept
    torch.save(ckpt, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match="no tensor changed, so a value outside the tensors did"):
        load_checkpoint(tmp_path / "edited.pth", _model())


def test_a_missing_or_damaged_digest_is_an_error(saved, tmp_path):
    path, _, _ = saved
    ckpt = torch.load(path, weights_only=True)
    for name, digest in (("none.pth", None), ("junk.pth", "deadbeef"), ("md5.pth", {**ckpt["digest"], "algorithm": "md5"})):
        broken = {**ckpt}
        if digest is None:
            del broken["digest"]
        else:
            broken["digest"] = digest
        torch.save(broken, tmp_path / name)
        with pytest.raises(CheckpointError, match="digest is missing or damaged"):
            load_checkpoint(tmp_path / name, _model())


def test_a_format_from_the_future_says_to_upgrade(saved, tmp_path):
    path, _, _ = saved
    ckpt = {**torch.load(path, weights_only=True), "format": "llm_from_scratch/checkpoint-v9"}
    torch.save(ckpt, tmp_path / "v9.pth")
    with pytest.raises(CheckpointError, match="upgrade llm_from_scratch"):
        load_checkpoint(tmp_path / "v9.pth", _model())


def test_truncated_file_is_refused_and_left_alone(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 1, 100):
        cut = tmp_path / f"cut{keep}.pth"
        cut.write_bytes(data[:keep])
        before = _sha(cut)
        model = _model(seed=2)
        weights = _weights(model)
        with pytest.raises(CheckpointError, match=r"not a readable checkpoint \(truncated or corrupt\?\).*Write it again"):
            load_checkpoint(cut, model)
        assert _sha(cut) == before and _unchanged(model, weights)


@pytest.mark.parametrize("content, expect", [
    (b"", "not a readable checkpoint"),
    (b"hello, this is a text file\n", "not a readable checkpoint"),
    (b'{"model_state_dict": {}}', "not a readable checkpoint"),
    (os.urandom(4096), "not a readable checkpoint"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, expect):
    path = tmp_path / "thing.pth"
    path.write_bytes(content)
    before = _sha(path)
    with pytest.raises(CheckpointError, match=expect) as err:
        load_checkpoint(path, _model())
    assert str(path) in str(err.value) and _sha(path) == before


def test_a_zip_that_is_not_from_torch_save(tmp_path):
    path = tmp_path / "archive.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "not a tensor in sight")
    before = _sha(path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as err:
        load_checkpoint(path, _model())
    assert "Write it again with save_checkpoint" in str(err.value) and _sha(path) == before


def test_a_plain_state_dict_and_a_tensor_are_not_checkpoints(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    torch.save(torch.zeros(3), tmp_path / "t.pth")
    for name in ("sd.pth", "t.pth"):
        with pytest.raises(CheckpointError, match="not a checkpoint from save_checkpoint.*load_gpt2_pth"):
            load_checkpoint(tmp_path / name, model)
    assert read_weights_only(tmp_path / "sd.pth").keys() == model.state_dict().keys()   # still readable as data


def test_a_folder_and_a_missing_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path, _model())
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pth", _model())


# ---------------------------------------------------------------- old files still load

def test_a_v1_checkpoint_without_digest_loads_unverified(saved, tmp_path):
    path, model, _ = saved
    old = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "digest"}
    old["format"] = CHECKPOINT_FORMAT_V1
    torch.save(old, tmp_path / "v1.pth")
    before = _sha(tmp_path / "v1.pth")
    fresh = _model(seed=3)
    ckpt = load_checkpoint(tmp_path / "v1.pth", fresh)
    assert ckpt["verified"] is False and ckpt["extra"] == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match="carries no digest.*require_digest=False"):
        load_checkpoint(tmp_path / "v1.pth", _model(), require_digest=True)
    assert _sha(tmp_path / "v1.pth") == before
    assert load_checkpoint(path, _model(), require_digest=True)["verified"] is True


def test_verify_digest_on_dicts():
    ckpt = {"format": checkpoint.CHECKPOINT_FORMAT, "model_state_dict": {"w": torch.arange(6.0).reshape(2, 3)},
            "extra": {"n": 1}}
    good = {**ckpt, "digest": content_digest(ckpt)}
    assert verify_digest(good) is True
    assert verify_digest({"w": torch.zeros(1)}) is False                  # a plain state dict: nothing to check
    assert verify_digest({"format": CHECKPOINT_FORMAT_V1}) is False
    transposed = {**good, "model_state_dict": {"w": torch.arange(6.0).reshape(3, 2)}}   # same bytes, other shape
    with pytest.raises(CheckpointError, match=r"changed: model_state_dict\.w"):
        verify_digest(transposed, "x.pth")
    halves = {**good, "model_state_dict": {"w": torch.arange(6.0).reshape(2, 3).half()}}  # other dtype
    with pytest.raises(CheckpointError, match="x.pth is corrupt"):
        verify_digest(halves, "x.pth")
    strided = torch.arange(12.0).reshape(3, 4)[:, ::2]                    # non-contiguous view: digest by value
    assert content_digest({"t": strided})["contents"] == content_digest({"t": strided.contiguous()})["contents"]


# ---------------------------------------------------------------- the wrong model

def test_a_checkpoint_of_another_config_names_tensor_and_fix(saved):
    path, _, _ = saved
    before = _sha(path)
    wide = _model(cfg={**CFG, "emb_dim": 32})
    weights = _weights(wide)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, wide)
    msg = str(err.value)
    assert "shape mismatch  tok_emb.weight" in msg and "(97, 16)" in msg and "(97, 32)" in msg
    assert "emb_dim=16 (model: 32)" in msg and "Build the model with the config the weights were saved from" in msg
    assert _unchanged(wide, weights) and _sha(path) == before
    biased = _model(cfg={**CFG, "qkv_bias": True})
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): trf_blocks\.0\.att\.W_query\.bias"):
        load_checkpoint(path, biased)


def test_an_optimizer_of_another_model_is_refused(saved):
    path, _, _ = saved
    other = _model(cfg={**CFG, "n_layers": 3})
    opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError):
        load_checkpoint(path, _model(), opt)                               # optimizer over other parameters


# ---------------------------------------------------------------- writes that cannot happen

def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_target_that_is_a_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(IsADirectoryError) as err:
        save_checkpoint(tmp_path / "runs", _model())
    msg = str(err.value)
    assert f"cannot write the checkpoint {tmp_path / 'runs'}: that is a folder" in msg and "checkpoint.pth" in msg
    assert _listing(tmp_path) == ["runs"] and _listing(tmp_path / "runs") == []


def test_parent_that_is_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    before = _sha(notes)
    for target in (notes / "run.pth", notes / "deeper" / "run.pth"):
        with pytest.raises(OSError) as err:
            save_checkpoint(target, _model())
        msg = str(err.value)
        assert f"cannot write the checkpoint {target}" in msg and ".tmp" not in msg
    assert _sha(notes) == before and _listing(tmp_path) == ["notes.txt"]


def test_missing_parents_are_created(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "b" / "run.pth", _model())
    assert load_checkpoint(path, _model())["verified"] is True and _listing(tmp_path / "a" / "b") == ["run.pth"]


def test_a_folder_without_permission_names_the_target_not_the_temp_file(tmp_path, monkeypatch, saved):
    path, model, _ = saved
    before = _sha(path)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".run.pth.x1y2.tmp"))
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as err:
        save_checkpoint(path, model)
    msg = str(err.value)
    assert msg.startswith(f"cannot write the checkpoint {path}: no new file can be created in {tmp_path}")
    assert "(Permission denied)" in msg and ".tmp" not in msg and "a file already at that path is unchanged" in msg
    assert _sha(path) == before and _listing(tmp_path) == ["run.pth"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_folder_for_real(tmp_path, saved):
    path, model, _ = saved
    before = _sha(path)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"cannot write the checkpoint {path}"):
            save_checkpoint(path, model)
    finally:
        tmp_path.chmod(0o700)
    assert _sha(path) == before and _listing(tmp_path) == ["run.pth"]


def test_a_full_disk_while_writing_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, saved):
    path, model, _ = saved
    before = _sha(path)

    def disk_full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as err:
        save_checkpoint(path, model)
    assert str(err.value).startswith(f"cannot write the checkpoint {path}: writing it failed (No space left on device)")
    assert _sha(path) == before and _listing(tmp_path) == ["run.pth"]
