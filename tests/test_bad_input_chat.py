"""Part 24's chat under bad input (issue 16): every class of bad input gets a message that names the problem and
the fix, never a traceback, and no file the user had is changed (hashes compared before and after).

The terminal chat runs as a real subprocess, in strict locales and with raw bytes that are not valid UTF-8."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_from_scratch.chat import (ChatModelError, ChatSession, check_context_size, encode_text, generate_reply,
                                   load_chat_model, read_chat_config, stream_reply)
from llm_from_scratch.checkpoint import save_checkpoint
from llm_from_scratch.gpt2 import save_gpt2_to_dir
from llm_from_scratch.model import GPTModel
from llm_from_scratch.tokenizer import gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}
E_ACUTE = 2634                                                  # GPT-2's token for "é"


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def digest(path: Path) -> dict:
    "sha256 of every file under `path` (or of `path` itself): compared before and after, to show nothing changed."
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("LLM_FROM_SCRATCH_DATA", str(ROOT.parent / "shared" / "data"))
    env.update(extra)
    return env


def chat(*args, input=b"", env=None, **kw):
    "Run `python -m llm_from_scratch.chat ARGS` with bytes on stdin; returns the CompletedProcess (bytes)."
    return subprocess.run([sys.executable, "-m", "llm_from_scratch.chat", *map(str, args)], input=input,
                          capture_output=True, env=env or _env(), cwd=ROOT, timeout=300, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "The user's files: a checkpoint, a model that always says 'é', a state dict of a non-GPT-2 width, its config."
    d = tmp_path_factory.mktemp("user_files")
    torch.manual_seed(0)
    save_checkpoint(d / "tiny.pth", GPTModel(TINY))
    accent = GPTModel(TINY)
    with torch.no_grad():                                       # logits = shift . W[t]: only token "é" scores above 0
        accent.final_norm.scale.zero_()
        accent.final_norm.shift.fill_(1.0)
        accent.out_head.weight.zero_()
        accent.out_head.weight[E_ACUTE] = 1.0
    save_checkpoint(d / "accent.pth", accent)
    torch.save(GPTModel(TINY).state_dict(), d / "plain_state_dict.pth")
    (d / "tiny.json").write_text(json.dumps(TINY))
    return d


@pytest.fixture
def unchanged(files):
    "Asserts after the test that every user file is byte for byte what it was."
    before = digest(files)
    yield files
    assert digest(files) == before


def assert_clean(run, code=0):
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == code, err
    assert "Traceback" not in err and "Error:" not in err.replace("chat: error:", ""), err
    return run.stdout.decode("utf-8", "replace"), err


# ---- stdin and stdout bytes ------------------------------------------------------------------------------------

INVALID = b"caf\xc3\xa9 \xff\xfe \xc3(\n" + b"\x80\x81 hello\n"        # valid UTF-8, then bytes that are not


@pytest.mark.parametrize("locale", [{"LC_ALL": "C", "PYTHONIOENCODING": "ascii"},      # strict: ASCII, errors raise
                                    {"LC_ALL": "C"},                                     # Python's UTF-8 mode
                                    {"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}])
def test_invalid_bytes_on_stdin_are_replaced_with_a_note(unchanged, locale):
    run = chat("--model", unchanged / "tiny.pth", "--max-new-tokens", "3", "--device", "cpu", input=INVALID,
               env=_env(**locale))
    out, err = assert_clean(run)
    assert out.count("Bot: ") == 2 and out.rstrip().endswith("Bye.")          # both lines were sent
    assert "U+FFFD" in err and "PYTHONIOENCODING=utf-8" in err                 # the problem, and how to avoid it
    assert err.count("chat: note:") == 1                                       # said once, not per line


def test_a_reply_the_terminal_cannot_show_is_printed_with_question_marks(unchanged):
    run = chat("--model", unchanged / "accent.pth", "--max-new-tokens", "3", "--device", "cpu", input=b"hi\n",
               env=_env(LC_ALL="C", PYTHONIOENCODING="ascii"))
    out, _ = assert_clean(run)
    assert "Bot: ???" in out                                                   # "ééé" in an ASCII terminal
    run = chat("--model", unchanged / "accent.pth", "--max-new-tokens", "3", "--device", "cpu", input=b"hi\n",
               env=_env(PYTHONIOENCODING="utf-8"))
    assert "Bot: ééé" in assert_clean(run)[0]                                  # the same reply where it can be shown


def test_no_stdin_at_all_is_a_clear_error(unchanged):
    run = subprocess.run([sys.executable, "-c", "import os, runpy; os.close(0); import sys; sys.stdin = None; "
                          "sys.argv = ['chat', '--model', 'course']; runpy.run_module('llm_from_scratch.chat', "
                          "run_name='__main__')"], capture_output=True, env=_env(), cwd=ROOT, timeout=300)
    _, err = assert_clean(run, code=1)
    assert "no standard input" in err and "pipe text" in err


def test_stdio_settings_are_restored_after_main(monkeypatch, files):
    import io
    from llm_from_scratch import chat as chat_module
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\n"), encoding="ascii", errors="strict")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert chat_module.main(["--model", str(files / "tiny.pth"), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert stdin.errors == "strict" and stdout.errors == "strict"


# ---- models and configs --------------------------------------------------------------------------------------

def test_state_dict_of_another_width_gets_advice_that_works_from_the_cli(unchanged):
    run = chat("--model", unchanged / "plain_state_dict.pth", input=b"hi\n")
    _, err = assert_clean(run, code=1)
    assert "plain_state_dict.pth" in err and "emb_dim=16" in err               # the file and the problem
    assert "--config FILE.json" in err and "save_checkpoint" in err            # two fixes that work
    run = chat("--model", unchanged / "plain_state_dict.pth", "--config", unchanged / "tiny.json",
               "--max-new-tokens", "3", "--device", "cpu", input=b"hi\n")
    out, _ = assert_clean(run)
    assert "plain_state_dict.pth" in out and out.count("Bot: ") == 1            # following the advice works


def test_the_same_advice_works_in_python(unchanged):
    with pytest.raises(ChatModelError, match="cfg=config"):
        load_chat_model(unchanged / "plain_state_dict.pth", device="cpu")
    model, _ = load_chat_model(unchanged / "plain_state_dict.pth", device="cpu", cfg=dict(TINY))
    assert model.cfg["emb_dim"] == 16


@pytest.mark.parametrize("content,words", [
    (b"{not json", ["not valid JSON", "line 1"]),
    (b"\xff\xfe{}", ["cannot be read", "UTF-8"]),
    (b"[1, 2]", ["not a usable model config", "JSON object"]),
    (json.dumps({**TINY, "n_heads": 3}).encode(), ["not divisible", "n_heads"]),
    (json.dumps({k: v for k, v in TINY.items() if k != "emb_dim"}).encode(), ["missing key", "emb_dim"]),
])
def test_bad_config_files(unchanged, tmp_path, content, words):
    config = tmp_path / "config.json"
    config.write_bytes(content)
    before = digest(config)
    run = chat("--model", unchanged / "plain_state_dict.pth", "--config", config, input=b"hi\n")
    _, err = assert_clean(run, code=1)
    assert "config.json" in err and all(w in err for w in words), err
    assert digest(config) == before


def test_config_file_missing_or_misplaced(unchanged, tmp_path):
    with pytest.raises(ChatModelError, match="no config file at"):
        read_chat_config(tmp_path / "nope.json")
    with pytest.raises(ChatModelError, match="only used with a state_dict file"):
        load_chat_model("course", device="cpu", cfg=unchanged / "tiny.json")
    _, err = assert_clean(chat("--model", "124M", "--config", unchanged / "tiny.json"), code=1)
    assert "leave it out" in err


def test_broken_model_folders(tmp_path):
    torch.manual_seed(0)
    folder = save_gpt2_to_dir(GPTModel(TINY), tmp_path / "hf")
    (folder / "config.json").write_text("{broken")
    (tmp_path / "empty").mkdir()
    (tmp_path / "number").mkdir()
    (tmp_path / "number" / "config.json").write_text("42")
    for path, words in [(folder, ["hf", "config.json and model.safetensors"]),
                        (tmp_path / "empty", ["empty", "no config.json"]),
                        (tmp_path / "number", ["number", "save_pretrained"])]:
        before = digest(path)
        with pytest.raises(ChatModelError) as e:
            load_chat_model(path, device="cpu")
        assert all(w in str(e.value) for w in words), str(e.value)
        assert digest(path) == before


def test_truncated_and_foreign_files(tmp_path, files):
    cut = tmp_path / "cut.pth"
    cut.write_bytes((files / "tiny.pth").read_bytes()[:5000])
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    for path in (cut, text):
        before = digest(path)
        _, err = assert_clean(chat("--model", path, input=b"hi\n"), code=1)
        assert path.name in err and "cannot be used as a chat model" in err and "save_checkpoint" in err
        assert digest(path) == before


# ---- the Python API --------------------------------------------------------------------------------------------

def test_context_size_beyond_the_window(tok):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    with pytest.raises(ValueError) as e:
        generate_reply(model, tok, "hi", context_size=1024, max_new_tokens=2)
    msg = str(e.value)
    assert "context_size=1024" in msg and "window is 64" in msg and "context_size=64 or less" in msg
    assert "in_idx" not in msg                                  # not the model's advice, which the caller cannot follow
    assert check_context_size(model, 64) == 64 and check_context_size(model, None) == 64


def test_model_without_a_config_is_not_a_bare_key_error(tok):
    class NoConfig(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg, self.w = cfg, nn.Parameter(torch.zeros(()))
    for cfg in ({}, {"context_length": "64"}, None):
        with pytest.raises(ValueError, match=r"cfg\['context_length'\]"):
            ChatSession(NoConfig(cfg), tok)
        with pytest.raises(ValueError, match="load_chat_model"):
            next(stream_reply(NoConfig(cfg), tok, "x"))


@pytest.mark.parametrize("typed", ["<|endoftext|>", "hi<|endoftext|>there", "<|endoftext|><|endoftext|>",
                                   "<|im_start|>user", "<|endoftext"])
def test_typed_special_tokens_stay_text(tok, typed):
    seen = []

    class Recorder(nn.Module):
        cfg = {"context_length": 256}

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, idx):                                 # (B, T) -> (B, T, V): always "\n", then stops
            seen.append(idx[0].tolist())
            out = torch.zeros(*idx.shape, 50257)
            out[..., 198] = 1.0
            return out

    s = ChatSession(Recorder(), tok, max_new_tokens=3)
    s.ask(typed)
    assert seen and all(50256 not in ids for ids in seen)
    assert tok.decode(encode_text(tok, typed)) == typed and s.history[0].text == typed
