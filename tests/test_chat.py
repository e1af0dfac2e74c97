"""Part 24: the transcript hack. Stop strings across tokens, streaming that never retracts, history cropping,
scoring rules, bad input, and the terminal chat as a real subprocess."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_from_scratch.chat import (DEFAULT_PREAMBLE, ChatModelError, ChatSession, MessageTooLongError,
                                   StopStringFilter, Turn, build_transcript, encode_text, fit_history, generate_reply,
                                   load_chat_model, score_reply, speaker_labels, stream_reply)
from llm_from_scratch.checkpoint import save_checkpoint
from llm_from_scratch.model import GPTModel
from llm_from_scratch.tokenizer import gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


class ScriptedModel(nn.Module):
    """Emits a fixed sequence of token ids, one per call (then repeats the last), whatever it reads; keeps what it read."""
    def __init__(self, script, context_length=64):
        super().__init__()
        self.script, self.calls, self.inputs = list(script), 0, []
        self.cfg = {"context_length": context_length, "vocab_size": 50257}
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx):                                     # (B, T) -> (B, T, V)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        self.inputs.append(idx[0].tolist())
        logits = torch.zeros(*idx.shape, 50257)
        logits[..., token] = 1.0
        return logits


def ids_of(tok, *pieces):
    "One token id per piece (each piece must be a single token)."
    out = []
    for p in pieces:
        ids = tok.encode(p) if isinstance(p, str) else [tok.encode_single_token(p)]
        assert len(ids) == 1, (p, ids)
        out += ids
    return out


def run_stream(model, tok, prompt="User: hi\nBot:", **kw):
    stream, pieces = stream_reply(model, tok, prompt, **kw), []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as e:
            return pieces, e.value


# ---- stop strings and streaming -------------------------------------------------------------------------------

def test_stop_string_split_across_tokens_stops_and_never_shows(tok):
    script = ids_of(tok, " Shiny", ".", "\n", "User", ":", " more", " text")
    model = ScriptedModel(script)
    pieces, end = run_stream(model, tok, max_new_tokens=20)
    assert end.stop_reason == "stop" and end.text == "Shiny."
    assert "".join(pieces) == end.text
    for part in ("\n", "User", ":"):                            # no piece of the stop string leaks out
        assert part not in end.text
    assert model.calls == 5                                     # it stopped at ":", not at max_new_tokens


def test_stop_string_inside_one_token_and_across_odd_splits(tok):
    for pieces in (["Sure", ".\nUs", "er", ": x"], ["Sure.", "\nU", "ser:", "x"], ["Sure.\nUser: x"]):
        f = StopStringFilter()
        shown = "".join(f.feed(p) for p in pieces) + f.flush()
        assert shown == "Sure." and f.stopped, pieces


def test_held_tail_is_released_when_it_is_not_a_stop(tok):
    f = StopStringFilter()
    out = [f.feed(p) for p in ["Hi", "\n", "Us", "ually", " yes"]] + [f.flush()]
    assert out[1] == "" and out[2] == ""                        # held while it might become "\nUser:"
    assert "".join(out) == "Hi\nUsually yes" and not f.stopped


def test_filter_rejects_bad_stop_strings():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringFilter(("",))


def test_stream_never_yields_half_a_character(tok):
    e_acute = "é".encode()                                      # split over two byte tokens
    byte_ids = [tok.encode_single_token(e_acute[:1]), tok.encode_single_token(e_acute[1:])]
    script = ids_of(tok, " caf") + byte_ids + ids_of(tok, "!") + [50256]
    pieces, end = run_stream(ScriptedModel(script), tok, max_new_tokens=20)
    assert end.text == "café!" and end.stop_reason == "eos"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == end.text


def test_stream_pieces_join_to_reply_and_whitespace_is_trimmed(tok):
    script = ids_of(tok, " Paris", ".", " ", "\n", "\n", "User", ":")
    pieces, end = run_stream(ScriptedModel(script), tok, max_new_tokens=20)
    assert end.text == "Paris." and "".join(pieces) == end.text and end.new_tokens == 7


def test_stream_hits_token_limit_and_flushes(tok):
    script = ids_of(tok, " one", " two", "\n", "Us")
    pieces, end = run_stream(ScriptedModel(script), tok, max_new_tokens=4)
    assert end.stop_reason == "max_new_tokens" and end.new_tokens == 4
    assert end.text == "one two\nUs" and "".join(pieces) == end.text   # no stop came: the held tail is text


def test_real_tiny_model_stream_equals_generate_reply(tok):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    end = generate_reply(model, tok, build_transcript([Turn("user", "hi")], "A chat.\n"), max_new_tokens=10)
    pieces, end2 = run_stream(model, tok, build_transcript([Turn("user", "hi")], "A chat.\n"), max_new_tokens=10)
    assert "".join(pieces) == end.text == end2.text


def test_sampling_is_repeatable_with_a_seed(tok):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    replies = []
    for _ in range(2):
        s = ChatSession(model, tok, preamble="A chat.\n", max_new_tokens=8, temperature=1.0, top_k=50, seed=7)
        replies.append(s.ask("hello"))
    assert replies[0] == replies[1]


def test_bad_options_are_refused(tok):
    model = ScriptedModel([13])
    for kw, word in [({"temperature": -0.5}, "temperature"), ({"top_k": 0}, "top_k"),
                     ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=word):
            next(stream_reply(model, tok, "x", **kw))
        with pytest.raises(ValueError, match=word):
            ChatSession(model, tok, **kw)


# ---- history ---------------------------------------------------------------------------------------------------

def test_fit_history_keeps_newest_turns_and_preamble(tok):
    history = []
    for i in range(20):
        history += [Turn("user", f"question {i} " + "word " * 5), Turn("bot", f"answer {i} " + "word " * 5)]
    history.append(Turn("user", "the newest question"))
    budget = 80
    kept, dropped = fit_history(history, tok, budget)
    assert kept == history[dropped:] and dropped > 0
    assert kept[-1].text == "the newest question" and kept[0].role == "user"
    text = build_transcript(kept)
    assert text.startswith(DEFAULT_PREAMBLE) and len(tok.encode(text)) <= budget
    more, _ = fit_history(history[dropped - 2:], tok, budget)
    assert more == kept                                         # dropping is by oldest first, deterministic


def test_message_too_long_is_a_clear_error(tok):
    with pytest.raises(MessageTooLongError, match="too long"):
        fit_history([Turn("user", "word " * 100)], tok, 40)


def test_session_crops_history_and_records_turns(tok):
    model = ScriptedModel(ids_of(tok, " ok", "\n", "User", ":"))
    s = ChatSession(model, tok, max_new_tokens=8)
    for i in range(6):
        model.calls = 0
        assert s.ask(f"message number {i}") == "ok"
    assert len(s.history) == 12 and s.dropped_turns > 0        # context 64 cannot hold six exchanges
    prompt = s.prompt_for("last")
    assert prompt.startswith(DEFAULT_PREAMBLE) and len(tok.encode(prompt)) <= 64 - 8


def test_session_bad_messages(tok):
    s = ChatSession(ScriptedModel([13]), tok, max_new_tokens=8)
    with pytest.raises(ValueError, match="empty"):
        s.send("  ")
    with pytest.raises(TypeError, match="str"):
        s.send(3)
    with pytest.raises(MessageTooLongError, match="at most"):
        s.send("word " * 200)
    assert s.history == []


def test_session_records_partial_reply_when_stopped_early(tok):
    s = ChatSession(ScriptedModel(ids_of(tok, " a", " b", " c")), tok, max_new_tokens=8)
    stream = s.send("hi")
    first = next(stream)
    stream.close()
    assert s.history == [Turn("user", "hi"), Turn("bot", first)]


def test_turn_checks_role():
    with pytest.raises(ValueError, match="'user' or 'bot'"):
        Turn("assistant", "x")


def test_session_records_the_message_even_if_the_reply_is_never_read(tok):
    s = ChatSession(ScriptedModel(ids_of(tok, " ok", "\n", "User", ":")), tok, max_new_tokens=8)
    s.send("first")                                            # the generator is never started
    assert s.history == [Turn("user", "first"), Turn("bot", "")]
    assert s.ask("second") == "ok"                             # sending again closes the unread stream
    assert s.history == [Turn("user", "first"), Turn("bot", ""), Turn("user", "second"), Turn("bot", "ok")]
    assert "User: first\nBot: \nUser: second\nBot:" in s.prompt_for("third")


def test_history_grows_with_each_piece_shown(tok):
    s = ChatSession(ScriptedModel(ids_of(tok, " a", " b", " c", "\n", "User", ":")), tok, max_new_tokens=8)
    stream = s.send("hi")
    assert next(stream) == "a" and s.history[-1] == Turn("bot", "a")
    assert next(stream) == " b" and s.history[-1] == Turn("bot", "a b")
    assert s.last is None                                      # not finished yet
    assert list(stream) == [" c"] and s.history[-1] == Turn("bot", "a b c") and s.last.stop_reason == "stop"


def test_prompt_for_has_no_side_effects(tok):
    s = ChatSession(ScriptedModel(ids_of(tok, " ok", "\n", "User", ":")), tok, max_new_tokens=8)
    for i in range(6):
        s.ask(f"message number {i}")
    dropped, history = s.dropped_turns, list(s.history)
    s.prompt_for("x")                                          # a short message: fewer turns would be dropped
    s.prompt_for("word " * 20)                                 # a long one: more
    assert s.dropped_turns == dropped and s.history == history and dropped > 0


def test_reset_forgets_and_closes(tok):
    s = ChatSession(ScriptedModel(ids_of(tok, " a", " b")), tok, max_new_tokens=8)
    stream = s.send("hi")
    next(stream)
    s.reset()
    assert s.history == [] and s.last is None and s.dropped_turns == 0
    assert list(stream) == []                                  # the old stream was closed


def test_user_text_never_becomes_the_end_of_text_token(tok):
    typed = "a <|endoftext|> b <|endoftext|>"
    assert 50256 in tok.encode(typed, allowed_special="all")  # what the old encoding did
    assert 50256 not in encode_text(tok, typed) and tok.decode(encode_text(tok, typed)) == typed
    model = ScriptedModel(ids_of(tok, " ok", "\n", "User", ":"))
    s = ChatSession(model, tok, max_new_tokens=8)
    assert s.ask(typed) == "ok"
    model.calls = 0
    assert s.ask("<|endoftext|>") == "ok"
    assert model.inputs and all(50256 not in ids for ids in model.inputs)
    assert 50256 not in encode_text(tok, s.prompt_for("<|endoftext|>"))


def test_streaming_leaves_autograd_on_between_pieces(tok):
    assert torch.is_grad_enabled()
    stream = stream_reply(ScriptedModel(ids_of(tok, " a", " b", " c")), tok, "x", max_new_tokens=3)
    next(stream)
    assert torch.is_grad_enabled()                             # a paused stream must not switch autograd off
    stream.close()


def test_context_size_larger_than_the_model_is_refused_with_advice_that_works(tok):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    with pytest.raises(ValueError, match=r"context_size=64 or less"):
        generate_reply(model, tok, "hi", context_size=65, max_new_tokens=2)
    assert generate_reply(model, tok, "hi", context_size=64, max_new_tokens=2).new_tokens == 2   # the advice works
    for bad in (0, -1, "64", 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            generate_reply(model, tok, "hi", context_size=bad, max_new_tokens=2)


def test_stop_must_be_strings(tok):
    with pytest.raises(TypeError, match="list/tuple of strings"):
        StopStringFilter(None)
    with pytest.raises(TypeError, match="list/tuple of strings"):
        ChatSession(ScriptedModel([13]), tok, stop=5)


# ---- scoring -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply,reason,failing", [
    ("Radiant.", "stop", None), ("Radiant.", "eos", None),
    ("", "stop", "non-empty"), ("  \n", "stop", "non-empty"),
    ("Radiant, shining", "max_new_tokens", "stops"),
    ("Radiant. User: thanks", "stop", "no user line"), ("Radiant. user : ok", "stop", "no user line"),
    ("Radiant.\nBot: also shiny", "stop", "one speaker"), ("\nROMEO:\nBright?", "stop", "one speaker"),
    ("Synonym: radiant.", "stop", None), ("Answer: Paris.\nNote: the capital.", "stop", None),
    ("Radiant.\n\nFirst Citizen:\nBright?", "stop", "one speaker"), ("KING RICHARD III: Bright!", "stop", "one speaker"),
    ("Radiant.\nAll:", "stop", "one speaker"),
])
def test_score_reply_rules(reply, reason, failing):
    s = score_reply(reply, reason)
    assert s["in role"] == (failing is None)
    if failing:
        assert not s[failing] and sum(not v for k, v in s.items() if k != "in role") == 1


def test_speaker_labels_tell_answers_from_speakers():
    assert speaker_labels("Synonym: radiant.") == []                                   # an answer, not a speaker
    assert speaker_labels("Synonym:\nradiant") == ["Synonym"]                         # the play format counts
    assert speaker_labels("a\nSecond Citizen:\nb\nMENENIUS: c\n  Bot: d\nUser:") == [
        "Second Citizen", "MENENIUS", "Bot", "User"]
    assert speaker_labels("Well: then.\nsee: here\nIt is 3:45 now") == []
    with pytest.raises(TypeError, match="str"):
        speaker_labels(None)


def test_score_reply_bad_input():
    with pytest.raises(ValueError, match="stop_reason"):
        score_reply("x", "finished")
    with pytest.raises(TypeError):
        score_reply(None, "stop")


# ---- loading and the command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat") / "tiny.pth"
    save_checkpoint(path, GPTModel(TINY))
    return path


def test_load_chat_model_from_checkpoint_and_errors(tiny_ckpt, tmp_path):
    model, name = load_chat_model(tiny_ckpt, device="cpu")
    assert model.cfg["context_length"] == 64 and "tiny.pth" in name and not model.training
    with pytest.raises(ChatModelError, match="not an existing file"):
        load_chat_model(tmp_path / "nope.pth", device="cpu")
    junk = tmp_path / "junk.pth"
    torch.save({"a": torch.zeros(2)}, junk)
    with pytest.raises(ChatModelError, match="cannot be used"):
        load_chat_model(junk, device="cpu")


def test_load_chat_model_from_hf_folder(tmp_path):
    from llm_from_scratch.gpt2 import save_gpt2_to_dir
    torch.manual_seed(0)
    folder = save_gpt2_to_dir(GPTModel(TINY), tmp_path / "hf")
    model, name = load_chat_model(folder, device="cpu")
    assert model.cfg["emb_dim"] == 16 and "hf" in name


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("LLM_FROM_SCRATCH_DATA", str(ROOT.parent / "shared" / "data"))
    return env


def _chat(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llm_from_scratch.chat", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=300, **kw)


def test_cli_session_to_end_of_input(tiny_ckpt):
    run = _chat("--model", str(tiny_ckpt), "--max-new-tokens", "5", "--device", "cpu",
                input="hello\n\nhow are you?\n")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "tiny.pth" in run.stdout and run.stdout.count("Bot: ") == 2 and run.stdout.rstrip().endswith("Bye.")


def test_cli_sampling_options(tiny_ckpt):
    run = _chat("--model", str(tiny_ckpt), "--max-new-tokens", "4", "--temperature", "0.9", "--top-k", "20",
                "--seed", "3", "--device", "cpu", input="hi\n")
    assert run.returncode == 0 and "Bye." in run.stdout, run.stderr


def test_cli_help():
    run = _chat("--help")
    assert run.returncode == 0 and "--max-new-tokens" in run.stdout and "--model" in run.stdout


def test_cli_missing_model_is_a_clear_error(tmp_path):
    run = _chat("--model", str(tmp_path / "missing.pth"), input="hi\n")
    assert run.returncode == 1
    assert "missing.pth" in run.stderr and "not an existing file" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.parametrize("opt", [["--temperature", "-1"], ["--top-k", "0"], ["--max-new-tokens", "0"],
                                 ["--max-new-tokens", "many"]])
def test_cli_bad_options(opt):
    run = _chat(*opt)
    assert run.returncode == 2 and ("must be" in run.stderr or "not an integer" in run.stderr)
    assert "Traceback" not in run.stderr


def test_cli_message_too_long_is_reported_and_the_chat_goes_on(tiny_ckpt):
    run = _chat("--model", str(tiny_ckpt), "--max-new-tokens", "5", "--device", "cpu",
                input="word " * 200 + "\nhi\n")
    assert run.returncode == 0 and "not sent" in run.stdout and run.stdout.count("Bot: ") == 1


def test_cli_sigint_exits_cleanly(tiny_ckpt):
    proc = subprocess.Popen([sys.executable, "-m", "llm_from_scratch.chat", "--model", str(tiny_ckpt),
                             "--max-new-tokens", "5", "--device", "cpu"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT, text=True)
    try:
        proc.stdin.write("hello\n")
        proc.stdin.flush()
        seen, deadline = "", time.monotonic() + 120
        while seen.count("You: ") < 2 and time.monotonic() < deadline:   # the second prompt: waiting for input
            seen += proc.stdout.read(1)
        assert seen.count("You: ") == 2, seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Bye." in out and "Traceback" not in err
