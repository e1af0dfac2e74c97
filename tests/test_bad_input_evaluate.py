"""Part 26's judge client against servers that misbehave (issue 16): redirects, replies that trickle one byte at a
time, replies far too large, streams cut before their end, 429/503 with Retry-After, 5xx, 404, 401, TLS failures,
malformed replies; bad urls and arguments; and results files that must never be touched unless they are results
files of the same run (checked with sha256).

Every server binds 127.0.0.1 on a free port, ends each reply by itself (no loop runs longer than SERVER_LIFETIME)
and shuts itself down after SERVER_LIFETIME even if a test forgets; every test asserts how long the client took."""
import hashlib
import http.server
import json
import math
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
from email.utils import formatdate

import pytest

from llm_from_scratch import evaluate
from llm_from_scratch.evaluate import (JudgeError, JudgeModelNotFoundError, JudgeRateLimitError, JudgeRedirectError,
                                       JudgeReplyError, JudgeResultsFileError, JudgeServerError, JudgeTimeoutError,
                                       JudgeTLSError, JudgeUnavailableError, JudgeURLError, generate_model_scores,
                                       query_model)

SERVER_LIFETIME = 30.0       # seconds: a server stops by itself after this, and so does every slow reply
MiB = 2 ** 20


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Every connection goes to 127.0.0.1 (or to a reserved .invalid name whose lookup a test fakes); `connects`
    lists the hosts the client tried."""
    real, connects = evaluate._connect, []

    def guarded(host, port, *args, **kwargs):
        assert host == "127.0.0.1" or host.endswith(".invalid"), f"the judge client tried to reach {host}"
        connects.append(host)
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(evaluate, "_connect", guarded)
    return connects


class _Handler(http.server.BaseHTTPRequestHandler):
    "Records each request, then lets the test's `behave(handler, n)` write the raw reply."
    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        try:
            self.server.behave(self, len(self.server.requests))
        except (BrokenPipeError, ConnectionResetError):
            pass                                      # the client gave up: that is what many tests want

    def log_message(self, *args):
        pass


def _raw(h, status: str, headers: dict | None = None, body: bytes = b""):
    "Write a whole HTTP/1.0 reply by hand (status line, headers, body)."
    head = f"HTTP/1.0 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
    h.wfile.write(head.encode("latin-1") + body)


def _json(h, status: str, value, extra: dict | None = None):
    body = json.dumps(value).encode()
    _raw(h, status, {"Content-Type": "application/json", "Content-Length": len(body), **(extra or {})}, body)


def _ollama_lines(*pieces, done=True, done_reason="stop") -> bytes:
    lines = [json.dumps({"message": {"role": "assistant", "content": p}, "done": False}) for p in pieces]
    if done:
        lines.append(json.dumps({"message": {"role": "assistant", "content": ""}, "done": True,
                                 "done_reason": done_reason}))
    return "".join(line + "\n" for line in lines).encode()


def _sse(*pieces, finish=None, done=True) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    if finish:
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + ("data: [DONE]\n\n" if done else "")
    return text.encode()


def _trickle(h, data: bytes, every: float = 0.2):
    "Send `data` one byte at a time, `every` seconds apart, for at most SERVER_LIFETIME."
    t0 = time.monotonic()
    for byte in data:
        if time.monotonic() - t0 > SERVER_LIFETIME:
            return
        h.wfile.write(bytes([byte]))
        time.sleep(every)


@pytest.fixture
def serve():
    "serve(behave) starts a server on 127.0.0.1; .url (Ollama path), .openai_url, .requests."
    servers = []

    def start(behave):
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.behave, httpd.requests = behave, []
        port = httpd.server_address[1]
        httpd.url = f"http://127.0.0.1:{port}/api/chat"
        httpd.openai_url = f"http://127.0.0.1:{port}/v1/chat/completions"
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        stop = threading.Timer(SERVER_LIFETIME, httpd.shutdown)     # stops by itself
        stop.daemon = True
        stop.start()
        servers.append((httpd, stop))
        return httpd

    yield start
    for httpd, stop in servers:
        stop.cancel()
        httpd.shutdown()
        httpd.server_close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, *args, **kwargs):
    "(exception or result, seconds taken)."
    t0 = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (the test inspects it)
        result = e
    return result, time.monotonic() - t0


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data(n):
    return [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}", "model_response": f"{i}"}
            for i in range(n)]


# ---- bad urls and arguments: refused before anything is sent

@pytest.mark.parametrize("url, problem", [
    ("localhost:11434/api/chat", "does not start with http:// or https://"),
    ("127.0.0.1:11434/api/chat", "does not start with http:// or https://"),
    ("ftp://127.0.0.1/api/chat", "scheme 'ftp'"),
    ("http:///api/chat", "names no host"),
    ("http://127.0.0.1:99999/api/chat", "port"),
    ("http://127.0.0.1:11434", "no path"),
    ("http://127.0.0.1:11434/", "no path"),
    ("", "not an address"),
    (None, "not an address"),
    ("http://127.0.0.1:11434/api/chat\n", "control character"),
    ("http://127.0.0.1:11434/api chat", "space"),
])
def test_bad_url_is_refused_before_any_connection(url, problem, _loopback_only, tmp_path):
    with pytest.raises(JudgeURLError) as info:
        query_model("hello", url=url)
    message = str(info.value)
    assert problem in message and "e.g. url='http://localhost:11434/api/chat'" in message
    assert isinstance(info.value, ValueError)
    assert "ollama serve" not in message and "install Ollama" not in message
    results = tmp_path / "scores.jsonl"
    with pytest.raises(JudgeURLError):
        generate_model_scores(_data(1), "model_response", url=url, results_path=results, progress=False)
    assert not results.exists()                           # refused before the results file was made
    assert _loopback_only == []                           # no connection was attempted


def test_url_with_credentials_is_refused():
    with pytest.raises(JudgeURLError, match="api_key="):
        query_model("hello", url="http://user:secret@127.0.0.1:11434/api/chat")


@pytest.mark.parametrize("kwargs, problem", [
    ({"timeout": 0}, "timeout=0"), ({"timeout": -1}, "timeout=-1"), ({"timeout": math.nan}, "timeout=nan"),
    ({"timeout": "5"}, "timeout='5'"), ({"retries": -1}, "retries=-1"), ({"retries": 1.5}, "retries=1.5"),
    ({"backoff": -1}, "backoff=-1"), ({"max_bytes": 0}, "max_bytes=0"), ({"api": "grpc"}, "api='grpc'"),
])
def test_bad_arguments_say_what_to_pass(kwargs, problem, _loopback_only):
    with pytest.raises(ValueError) as info:
        query_model("hello", url="http://127.0.0.1:9/api/chat", **kwargs)
    assert problem in str(info.value) and ("pass" in str(info.value) or "use" in str(info.value))
    assert _loopback_only == []


def test_api_key_with_a_line_break_is_refused_without_echoing_it():
    with pytest.raises(ValueError, match="line break") as info:
        query_model("hello", url="http://127.0.0.1:9/api/chat", api_key="sk-secret\nX-Evil: 1")
    assert "sk-secret" not in str(info.value)


# ---- where the connection cannot be made

def test_refused_connection_alone_suggests_starting_ollama():
    url = f"http://127.0.0.1:{_free_port()}/api/chat"
    (e, took) = _timed(query_model, "hello", url=url, retries=3, backoff=1.0)
    assert isinstance(e, JudgeUnavailableError) and took < 1.0      # not retried: nothing listens there
    assert url in str(e) and "refused" in str(e) and "ollama serve" in str(e) and "url=" in str(e)


def test_unknown_host_says_check_the_url(monkeypatch):
    def no_such_host(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(JudgeUnavailableError) as info:
        query_model("hello", url="http://judge.invalid:11434/api/chat")
    message = str(info.value)
    assert "'judge.invalid'" in message and "cannot be found" in message and "spelling of url=" in message
    assert "ollama serve" not in message


def test_slow_host_lookup_is_bounded_by_the_deadline(monkeypatch):
    real = socket.getaddrinfo

    def slow(host, *args, **kwargs):
        if host.endswith(".invalid"):
            time.sleep(5)
            raise socket.gaierror(socket.EAI_NONAME, "too late")
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", slow)
    e, took = _timed(query_model, "hello", url="http://slow.invalid:11434/api/chat", timeout=0.5, retries=0)
    assert isinstance(e, JudgeTimeoutError) and "looking up the host" in str(e) and "raise timeout=" in str(e)
    assert took < 1.5


def test_tls_failure_is_its_own_error(serve):
    server = serve(lambda h, n: _json(h, "200 OK", {"message": {"content": "85"}, "done": True}))
    url = server.url.replace("http://", "https://")       # a plain-http server, spoken to in TLS
    e, took = _timed(query_model, "hello", url=url, timeout=5, retries=2)
    assert isinstance(e, JudgeTLSError), e
    message = str(e)
    assert "https handshake" in message and "http://" in message and "ssl_context=" in message
    assert "ollama serve" not in message and "install Ollama" not in message
    assert took < 3


@pytest.fixture
def tls_serve(serve, tmp_path):
    "serve_tls(behave): the same server behind TLS, with a self-signed certificate for 127.0.0.1 (made by openssl)."
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)

    def start(behave):
        server = serve(behave)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.url = server.url.replace("http://", "https://")
        return server, cert
    return start


def test_untrusted_certificate_is_a_tls_error_and_ssl_context_fixes_it(tls_serve):
    server, cert = tls_serve(lambda h, n: _raw(h, "200 OK", {}, _ollama_lines("85")))
    e, took = _timed(query_model, "hello", url=server.url, timeout=5, retries=2)
    assert isinstance(e, JudgeTLSError), e
    assert "certificate verify failed" in str(e) and "ssl_context=ssl.create_default_context(cafile=" in str(e)
    assert "ollama serve" not in str(e) and took < 3 and server.requests == []
    trusted = ssl.create_default_context(cafile=str(cert))     # the fix the message names
    assert query_model("hello", url=server.url, ssl_context=trusted) == "85"


# ---- redirects are never followed, credentials never leave the configured host

@pytest.mark.parametrize("code", ["301 Moved Permanently", "302 Found", "303 See Other",
                                  "307 Temporary Redirect", "308 Permanent Redirect"])
def test_redirect_is_an_error_naming_the_target_and_nothing_is_sent_there(serve, code):
    elsewhere = serve(lambda h, n: _json(h, "200 OK", {"message": {"content": "99"}, "done": True}))
    judge = serve(lambda h, n: _raw(h, code, {"Location": elsewhere.url, "Content-Length": 0}))
    e, took = _timed(query_model, "hello", url=judge.url, api_key="sk-secret", retries=2)
    assert isinstance(e, JudgeRedirectError), e
    assert elsewhere.url in str(e) and f"url={elsewhere.url!r}" in str(e) and code.split()[0] in str(e)
    assert elsewhere.requests == []                       # not followed: no request, no key went there
    assert len(judge.requests) == 1                       # and not retried
    assert judge.requests[0]["headers"]["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in str(e) and took < 2


def test_relative_redirect_is_named_in_full(serve):
    judge = serve(lambda h, n: _raw(h, "302 Found", {"Location": "/login", "Content-Length": 0}))
    with pytest.raises(JudgeRedirectError, match=r"a redirect to http://127\.0\.0\.1:\d+/login"):
        query_model("hello", url=judge.url)


# ---- one deadline for the whole reply, however the bytes arrive

def _stalling(where):
    "A server that sends its reply one byte every 0.2 s, starting at `where`."
    head = b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n"
    body = b'{"message": {"content": "8' + b"5" * 400        # never a newline, never done

    def behave(h, n):
        if where == "status line":
            _trickle(h, head + body)
        elif where == "body":
            h.wfile.write(head)
            _trickle(h, body)
        elif where == "chunk size":
            h.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            _trickle(h, b"1" * 400)
        elif where == "silence":
            h.wfile.write(head)
            time.sleep(SERVER_LIFETIME / 3)
    return behave


@pytest.mark.parametrize("where", ["status line", "body", "chunk size", "silence"])
def test_trickling_reply_cannot_outlast_the_timeout(serve, where):
    judge = serve(_stalling(where))
    e, took = _timed(query_model, "hello", url=judge.url, timeout=1.0, retries=0)
    assert isinstance(e, JudgeTimeoutError), e
    assert "timeout=1.0 s" in str(e) and "raise timeout=" in str(e)
    assert took < 1.8                                     # the deadline, not the byte rate, decides


def test_retries_share_one_overall_bound(serve):
    judge = serve(_stalling("body"))
    e, took = _timed(query_model, "hello", url=judge.url, timeout=0.6, retries=2, backoff=0.0)
    assert isinstance(e, JudgeTimeoutError) and "3 tries" in str(e)
    assert len(judge.requests) == 3 and took < 3 * 0.6 + 0.8


def test_complete_reply_is_returned_without_waiting_for_the_server_to_hang_up(serve):
    def behave(h, n):
        _raw(h, "200 OK", {"Content-Type": "application/x-ndjson"}, _ollama_lines("8", "5"))
        time.sleep(SERVER_LIFETIME / 3)                   # keeps the connection open after done: true
    judge = serve(behave)
    result, took = _timed(query_model, "hello", url=judge.url, timeout=5)
    assert result == "85" and took < 1.5


# ---- a size cap on replies and on error pages

def _flood(h, n, status="200 OK", line=True):
    "20 MiB as fast as the socket takes it."
    h.wfile.write(f"HTTP/1.0 {status}\r\nContent-Type: application/x-ndjson\r\n\r\n".encode())
    piece = (json.dumps({"message": {"content": "x" * 900}, "done": False}) + "\n").encode() if line else b"x" * 65536
    sent = 0
    while sent < 20 * MiB:
        h.wfile.write(piece)
        sent += len(piece)


@pytest.mark.parametrize("line", [True, False], ids=["many lines", "one endless line"])
def test_twenty_mib_stream_fails_fast_with_little_memory(serve, line):
    judge = serve(lambda h, n: _flood(h, n, line=line))
    tracemalloc.start()
    try:
        e, took = _timed(query_model, "hello", url=judge.url, timeout=20, retries=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(e, JudgeReplyError), e
    assert "larger than max_bytes=1,048,576 bytes" in str(e) and "url=" in str(e)
    assert len(judge.requests) == 1                       # a flood is not retried
    assert took < 5 and peak < 8 * MiB


def test_announced_size_over_the_cap_is_refused_before_reading(serve):
    judge = serve(lambda h, n: _raw(h, "200 OK", {"Content-Length": 20 * MiB}, b"{"))
    e, took = _timed(query_model, "hello", url=judge.url, timeout=5)
    assert isinstance(e, JudgeReplyError) and "announced 20,971,520 bytes" in str(e) and took < 1


def test_smaller_cap_is_respected(serve):
    judge = serve(lambda h, n: _raw(h, "200 OK", {"Content-Type": "application/x-ndjson"},
                                    _ollama_lines("8" * 500, "5")))
    with pytest.raises(JudgeReplyError, match="max_bytes=100 "):
        query_model("hello", url=judge.url, max_bytes=100)
    assert query_model("hello", url=judge.url, max_bytes=10_000) == "8" * 500 + "5"


def test_huge_error_page_is_read_only_as_far_as_its_message(serve):
    judge = serve(lambda h, n: _flood(h, n, status="500 Internal Server Error", line=False))
    e, took = _timed(query_model, "hello", url=judge.url, timeout=20, retries=1, backoff=0.0)
    assert isinstance(e, JudgeServerError) and "HTTP 500" in str(e) and "check its log" in str(e)
    assert len(str(e)) < 600 and took < 3


# ---- complete only when the protocol says so

def test_ollama_stream_cut_before_done_is_not_a_score(serve):
    judge = serve(lambda h, n: _raw(h, "200 OK", {"Content-Type": "application/x-ndjson"},
                                    _ollama_lines("8", done=False)))
    e, took = _timed(query_model, "hello", url=judge.url, retries=1, backoff=0.0)
    assert isinstance(e, JudgeReplyError), e
    assert "before it was complete" in str(e) and "no done: true" in str(e) and "'8'" in str(e)
    assert "not a score" in str(e) and len(judge.requests) == 2 and took < 2


def test_openai_stream_cut_after_first_chunk_is_not_scored_8(serve):
    judge = serve(lambda h, n: _raw(h, "200 OK", {"Content-Type": "text/event-stream"}, _sse("8", done=False)))
    with pytest.raises(JudgeReplyError, match=r"no \[DONE\] or a finish_reason; text so far '8'"):
        query_model("hello", url=judge.openai_url, stream=True, retries=0)
    results = []
    with pytest.raises(JudgeReplyError):
        results = generate_model_scores(_data(1), "model_response", url=judge.openai_url, stream=True, retries=0,
                                        progress=False)
    assert results == []


@pytest.mark.parametrize("body, expected", [
    (_sse("8", "5", finish="stop"), "85"),                     # the full stream: [DONE] at the end
    (_sse("8", "5", finish="stop", done=False), "85"),         # no [DONE], but a finish_reason: complete
    (b"event: message\n" + _sse("8", "5", finish="stop") + b": keep-alive\n", "85"),   # SSE fields and comments
])
def test_openai_streams_that_are_complete(serve, body, expected):
    judge = serve(lambda h, n: _raw(h, "200 OK", {"Content-Type": "text/event-stream"}, body))
    assert query_model("hello", url=judge.openai_url, stream=True) == expected


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_reply_stopped_at_length_limit_is_an_error(serve, api):
    if api == "ollama":
        body = _ollama_lines("The answer deserves", done_reason="length")
    else:
        body = json.dumps({"choices": [{"message": {"content": "The answer deserves"},
                                        "finish_reason": "length"}]}).encode()
    judge = serve(lambda h, n: _raw(h, "200 OK", {}, body))
    url = judge.url if api == "ollama" else judge.openai_url
    with pytest.raises(JudgeReplyError, match="stopped its reply early \\('length'\\)") as info:
        query_model("hello", url=url)
    assert "num_ctx=" in str(info.value) and len(judge.requests) == 1


def test_empty_reply_is_incomplete(serve):
    judge = serve(lambda h, n: _raw(h, "200 OK", {"Content-Length": 0}))
    with pytest.raises(JudgeReplyError, match="0 chunks"):
        query_model("hello", url=judge.url, retries=0)


# ---- Retry-After within the deadline

@pytest.mark.parametrize("status", ["429 Too Many Requests", "503 Service Unavailable"])
def test_retry_after_is_honoured(serve, status):
    def behave(h, n):
        if n == 1:
            _json(h, status, {"error": "slow down"}, {"Retry-After": "1"})
        else:
            _raw(h, "200 OK", {}, _ollama_lines("85"))
    judge = serve(behave)
    result, took = _timed(query_model, "hello", url=judge.url, timeout=5, retries=1, backoff=0.0)
    assert result == "85" and len(judge.requests) == 2
    assert 0.9 <= took < 2.5                              # it waited what the server asked, not backoff=0


def test_retry_after_as_a_date_is_honoured(serve):
    def behave(h, n):
        if n == 1:
            _json(h, "429 Too Many Requests", {"error": "slow down"}, {"Retry-After": formatdate(time.time() + 2,
                                                                                                usegmt=True)})
        else:
            _raw(h, "200 OK", {}, _ollama_lines("85"))
    judge = serve(behave)
    result, took = _timed(query_model, "hello", url=judge.url, timeout=5, retries=1, backoff=0.0)
    assert result == "85" and 0.5 <= took < 3.5


def test_retry_after_longer_than_the_time_left_fails_at_once(serve):
    judge = serve(lambda h, n: _json(h, "429 Too Many Requests", {"error": "quota"}, {"Retry-After": "3600"}))
    e, took = _timed(query_model, "hello", url=judge.url, timeout=2, retries=2)
    assert isinstance(e, JudgeRateLimitError), e
    assert "asks to wait 3600 s" in str(e) and "Retry-After" in str(e) and "quota" in str(e)
    assert "timeout=" in str(e) and took < 1 and len(judge.requests) == 1


def test_rate_limit_without_retry_after_gives_up_with_advice(serve):
    judge = serve(lambda h, n: _json(h, "429 Too Many Requests", {"error": {"message": "rate limit reached"}}))
    e, took = _timed(query_model, "hello", url=judge.url, retries=2, backoff=0.01)
    assert isinstance(e, JudgeRateLimitError) and "HTTP 429: rate limit reached" in str(e)
    assert "3 tries" in str(e) and "results_path=" in str(e) and len(judge.requests) == 3 and took < 2


# ---- status codes, each with its own message

def test_server_error_on_every_try(serve):
    judge = serve(lambda h, n: _json(h, "500 Internal Server Error", {"error": "llama runner process has terminated"}))
    e, took = _timed(query_model, "hello", url=judge.url, retries=2, backoff=0.01)
    assert isinstance(e, JudgeServerError), e
    assert "HTTP 500: llama runner process has terminated" in str(e) and "log" in str(e) and "3 tries" in str(e)
    assert len(judge.requests) == 3 and took < 2


def test_missing_model_says_ollama_pull(serve):
    judge = serve(lambda h, n: _json(h, "404 Not Found", {"error": "model \"judge-x\" not found, try pulling it first"}))
    with pytest.raises(JudgeModelNotFoundError, match="`ollama pull judge-x`"):
        query_model("hello", model="judge-x", url=judge.url, retries=2)
    assert len(judge.requests) == 1


def test_wrong_path_404_points_at_the_path(serve):
    judge = serve(lambda h, n: _raw(h, "404 Not Found", {"Content-Type": "text/plain"}, b"404 page not found"))
    with pytest.raises(JudgeModelNotFoundError, match="check the path of url=: Ollama's chat endpoint is /api/chat"):
        query_model("hello", url=judge.url.replace("/api/chat", "/api/chatt"))


def test_unauthorised_asks_for_api_key(serve):
    judge = serve(lambda h, n: _json(h, "401 Unauthorized", {"error": {"message": "invalid api key"}}))
    with pytest.raises(JudgeError, match="HTTP 401 \\(invalid api key\\).*pass api_key="):
        query_model("hello", url=judge.openai_url, api_key="wrong")
    assert len(judge.requests) == 1


# ---- malformed replies

@pytest.mark.parametrize("body, problem", [
    (b"<html><body>a login page</body></html>", "is not JSON"),
    (b"[1, 2, 3]", "holds a JSON list, not an object"),
    (b'{"response": "85", "done": false}\n{"response": "", "done": true}\n', "not /api/generate"),
    (b'{"message": {"content": "8"}, "done": false}\n{"error": "CUDA out of memory"}\n', "CUDA out of memory"),
    (b'{"message": {"content": "8"}, "done": false}\nnot json at all\n', "is not JSON"),
    (b"\xff\xfe\x00garbage", "is not JSON"),
])
def test_malformed_reply_says_what_is_wrong(serve, body, problem):
    judge = serve(lambda h, n: _raw(h, "200 OK", {"Content-Type": "application/x-ndjson"}, body))
    e, took = _timed(query_model, "hello", url=judge.url, retries=2, backoff=0.0)
    assert isinstance(e, (JudgeReplyError, JudgeServerError)) and problem in str(e), e
    assert len(judge.requests) == 1 and took < 1          # a malformed reply is not retried


def test_openai_reply_without_choices_points_at_the_api(serve):
    judge = serve(lambda h, n: _json(h, "200 OK", {"message": {"content": "85"}, "done": True}))
    with pytest.raises(JudgeReplyError, match="no 'choices'.*api='ollama'"):
        query_model("hello", url=judge.url, api="openai")


def test_only_a_refused_connection_suggests_starting_ollama(serve, monkeypatch):
    "Each failure class has its own message; only 'nothing listens' tells the reader to start Ollama."
    messages = {}
    for name, behave in {
        "redirect": lambda h, n: _raw(h, "302 Found", {"Location": "http://127.0.0.1:9/x", "Content-Length": 0}),
        "404": lambda h, n: _json(h, "404 Not Found", {"error": "model not found"}),
        "429": lambda h, n: _json(h, "429 Too Many Requests", {"error": "busy"}),
        "500": lambda h, n: _json(h, "500 Internal Server Error", {"error": "broken"}),
        "malformed": lambda h, n: _raw(h, "200 OK", {}, b"<html>"),
        "timeout": _stalling("silence"),
    }.items():
        judge = serve(behave)
        e, _ = _timed(query_model, "hello", url=judge.url, timeout=0.5, retries=0)
        messages[name] = (type(e).__name__, str(e))
    e, _ = _timed(query_model, "hello", url="localhost:11434/api/chat")
    messages["bad url"] = (type(e).__name__, str(e))
    e, _ = _timed(query_model, "hello", url=f"http://127.0.0.1:{_free_port()}/api/chat")
    messages["refused"] = (type(e).__name__, str(e))
    classes = [cls for cls, _ in messages.values()]
    assert len(set(classes)) == len(classes), messages     # one class per failure
    assert [name for name, (_, m) in messages.items() if "ollama serve" in m] == ["refused"]


# ---- results files: only this run's are ever changed

def _responses_file(tmp_path):
    "A file like part 25's answers: a JSON list, indented, without a final newline."
    path = tmp_path / "instruction-data-with-response.json"
    path.write_text(json.dumps(_data(3), indent=4), encoding="utf-8")
    return path


@pytest.mark.parametrize("make", ["responses", "text without newline", "other jsonl", "binary"])
def test_a_file_that_is_not_a_results_file_is_refused_untouched(serve, tmp_path, make):
    judge = serve(lambda h, n: _raw(h, "200 OK", {}, _ollama_lines("85")))
    if make == "responses":
        path = _responses_file(tmp_path)
    else:
        path = tmp_path / "notes.jsonl"
        path.write_bytes({"text without newline": b"my notes, not saved anywhere else",
                          "other jsonl": b'{"index": 0, "score": 5}\n{"index": 1, "sco',
                          "binary": bytes(range(256)) * 10}[make])
    before = _sha(path)
    with pytest.raises(JudgeResultsFileError) as info:
        generate_model_scores(_data(3), "model_response", url=judge.url, results_path=path, progress=False)
    message = str(info.value)
    assert "not a results file" in message and "left untouched" in message
    assert "-scores.jsonl" in message and "json_data" in message       # the fix: another file for results
    assert _sha(path) == before and judge.requests == []              # byte for byte, and nothing asked


def test_another_runs_file_with_a_half_line_is_refused_not_repaired(serve, tmp_path):
    judge = serve(lambda h, n: _raw(h, "200 OK", {}, _ollama_lines("85")))
    path = tmp_path / "scores.jsonl"
    generate_model_scores(_data(3), "model_response", url=judge.url, results_path=path, progress=False)
    with open(path, "ab") as f:
        f.write(b'{"index": 2, "prom')                    # as if killed mid-write
    before, asked = _sha(path), len(judge.requests)
    with pytest.raises(JudgeResultsFileError, match="another run.*left untouched"):
        generate_model_scores(_data(3), "model_response", model="other-judge", url=judge.url, results_path=path,
                              progress=False)
    assert _sha(path) == before and len(judge.requests) == asked


def test_corrupt_results_file_is_refused_not_repaired(serve, tmp_path):
    judge = serve(lambda h, n: _raw(h, "200 OK", {}, _ollama_lines("85")))
    path = tmp_path / "scores.jsonl"
    generate_model_scores(_data(3), "model_response", url=judge.url, results_path=path, progress=False)
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"edited by hand"
    path.write_bytes(b"\n".join(lines) + b'{"index": 2, "pr')
    before = _sha(path)
    with pytest.raises(JudgeResultsFileError, match="line 3, is not a JSON record"):
        generate_model_scores(_data(3), "model_response", url=judge.url, results_path=path, progress=False)
    assert _sha(path) == before
    lines = path.read_bytes().split(b"\n")                # a score outside 0-100 is refused too
    lines[2] = json.dumps({"index": 1, "prompt_id": "x", "score": 850, "reply": "850"}).encode()
    path.write_bytes(b"\n".join(lines))
    before = _sha(path)
    with pytest.raises(JudgeResultsFileError, match="score 850"):
        generate_model_scores(_data(3), "model_response", url=judge.url, results_path=path, progress=False)
    assert _sha(path) == before


def test_folder_as_results_path_is_refused(serve, tmp_path):
    judge = serve(lambda h, n: _raw(h, "200 OK", {}, _ollama_lines("85")))
    with pytest.raises(JudgeResultsFileError, match="not a regular file"):
        generate_model_scores(_data(1), "model_response", url=judge.url, results_path=tmp_path, progress=False)
    assert judge.requests == []


def test_this_runs_file_is_repaired_and_an_empty_file_is_started(serve, tmp_path):
    judge = serve(lambda h, n: _raw(h, "200 OK", {}, _ollama_lines("85")))
    empty = tmp_path / "new.jsonl"
    empty.touch()
    assert generate_model_scores(_data(2), "model_response", url=judge.url, results_path=empty,
                                 progress=False) == [85, 85]
    header = json.loads(empty.read_text().splitlines()[0])
    assert header["format"] == "llm_from_scratch judge results" and header["run"]["n"] == 2
    whole = empty.read_bytes()
    empty.write_bytes(whole + b'{"index": 1, "pro')       # this run's file, killed mid-write: repaired
    asked = len(judge.requests)
    assert generate_model_scores(_data(2), "model_response", url=judge.url, results_path=empty,
                                 progress=False) == [85, 85]
    assert empty.read_bytes() == whole and len(judge.requests) == asked
