"""Part 26: the judge client against a real HTTP server on 127.0.0.1 (streaming and not, every failure the
notebook promises to handle), resumable scoring, input checks, correlations and ROUGE-L on known cases."""
import http.server
import json
import math
import socket
import threading
import time

import pytest

from llm_from_scratch import evaluate
from llm_from_scratch.evaluate import (JudgeError, JudgeInputError, JudgeModelNotFoundError, JudgeTimeoutError,
                                       JudgeUnavailableError, generate_model_scores, judge_prompt, kendall_tau,
                                       lcs_length, parse_score, pearson, query_model, rank_average, rouge_l,
                                       rouge_tokens, score_summary, spearman)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Every connection the client opens must go to 127.0.0.1: fail the test otherwise, before anything is sent."""
    real = evaluate._connect

    def guarded(host, port, *args, **kwargs):
        assert host == "127.0.0.1", f"the judge client tried to reach {host}"
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(evaluate, "_connect", guarded)


class _Judge(http.server.BaseHTTPRequestHandler):
    """A stand-in judge speaking Ollama's /api/chat (streamed NDJSON, or one object with "stream": false) and the
    OpenAI-compatible /v1/chat/completions. `reply(prompt)` gives the text; `behaviour` selects a failure."""
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state = self.server.state
        state["requests"].append(body)
        prompt = body["messages"][0]["content"]
        mode = state["behaviour"](len(state["requests"]), body) if callable(state["behaviour"]) else state["behaviour"]
        if mode == "404":
            self._send(404, json.dumps({"error": f"model \"{body['model']}\" not found, try pulling it first"}))
            return
        if mode == "503":
            self._send(503, "busy")
            return
        if mode == "html":
            self._send(200, "<html><body>not a judge</body></html>")
            return
        if mode == "cut":                                   # stream two pieces, then hang up before "done"
            self._send(200, "".join(json.dumps({"message": {"content": p}, "done": False}) + "\n" for p in "85"))
            return
        if mode == "die":                                   # stop listening, and hang up without a reply
            httpd = state["httpd"]
            threading.Thread(target=lambda: (httpd.shutdown(), httpd.server_close())).start()
            self.close_connection = True
            return
        if mode == "slow":
            time.sleep(state.get("delay", 1.0))
        text = state["reply"](prompt)
        if self.path.endswith("/chat/completions"):
            self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}))
        elif body.get("stream", True):
            pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
            lines = [json.dumps({"message": {"role": "assistant", "content": p}, "done": False}) for p in pieces]
            lines.append(json.dumps({"message": {"role": "assistant", "content": ""}, "done": True}))
            self._send(200, "".join(line + "\n" for line in lines))
        else:
            self._send(200, json.dumps({"message": {"role": "assistant", "content": text}, "done": True}, indent=2))

    def _send(self, code, text):
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def make_judge():
    """Start stand-in judges on 127.0.0.1: each has `.set(reply=prompt -> text, behaviour=...)` with behaviour
    'ok', 'slow', '404', '503', 'html', 'die' or a function of (request number, body) returning one of those;
    `.requests` lists every request body it received."""
    servers = []

    def make():
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
        httpd.state = {"requests": [], "behaviour": "ok", "reply": lambda prompt: "85", "httpd": httpd}
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)

        class Judge:
            requests = httpd.state["requests"]
            url = f"http://127.0.0.1:{httpd.server_address[1]}/api/chat"
            openai_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"

            def set(self, **kw):
                httpd.state.update(kw)
        return Judge()

    yield make
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def judge(make_judge):
    return make_judge()


def _free_port():
    "A port on 127.0.0.1 with nothing listening (bound, then released)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n):
    return [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}", "model_response": f"{i}"}
            for i in range(n)]


# ---- query_model against a real server

@pytest.mark.parametrize("stream", [None, False])
def test_query_model_reads_streamed_and_single_replies(judge, stream):
    judge.set(reply=lambda p: "Score: 85, since the answer is right.")
    assert query_model("hello", url=judge.url, stream=stream) == "Score: 85, since the answer is right."
    sent = judge.requests[-1]
    assert sent["messages"] == [{"role": "user", "content": "hello"}]
    assert sent["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048}
    assert ("stream" in sent) == (stream is not None)


def test_query_model_speaks_openai_compatible_servers(judge):
    judge.set(reply=lambda p: "73")
    assert query_model("hello", model="m", url=judge.openai_url) == "73"
    assert judge.requests[-1]["stream"] is False and judge.requests[-1]["seed"] == 123


@pytest.mark.parametrize("reply, expected", [("85", 85), ("I'd give it 85.", 85), ("Score: 85/100", 85),
                                             ("101", None), ("no number here", None), ("", None)])
def test_scores_from_real_replies(judge, reply, expected):
    judge.set(reply=lambda p: reply)
    assert generate_model_scores(_data(2), "model_response", url=judge.url, progress=False) == [expected] * 2


def test_slow_reply_times_out_after_retries(judge):
    judge.set(behaviour="slow", delay=1.0)
    t0 = time.monotonic()
    with pytest.raises(JudgeTimeoutError, match=r"whole reply within timeout=0.2 s \(2 tries"):
        query_model("hello", url=judge.url, timeout=0.2, retries=1, backoff=0.0)
    assert len(judge.requests) == 2 and time.monotonic() - t0 < 5


def test_busy_server_is_retried_then_succeeds(judge):
    judge.set(behaviour=lambda n, body: "503" if n <= 2 else "ok")
    assert query_model("hello", url=judge.url, retries=2, backoff=0.01) == "85"
    assert len(judge.requests) == 3


def test_model_not_pulled_says_ollama_pull(judge):
    judge.set(behaviour="404")
    with pytest.raises(JudgeModelNotFoundError, match="ollama pull llama3"):
        query_model("hello", url=judge.url, retries=3)
    assert len(judge.requests) == 1                         # a missing model is not retried


def test_refused_connection_is_one_clear_error():
    url = f"http://127.0.0.1:{_free_port()}/api/chat"
    t0 = time.monotonic()
    with pytest.raises(JudgeUnavailableError) as info:
        query_model("hello", url=url, retries=3, backoff=1.0)
    message = str(info.value)
    assert url in message and "ollama serve" in message and "url=" in message
    assert time.monotonic() - t0 < 1.0                      # not retried: nothing listens there
    assert info.value.__cause__ is None                      # one error, not a chain


def test_reply_cut_off_before_done_is_retried_not_scored(judge):
    judge.set(behaviour=lambda n, body: "cut" if n == 1 else "ok", reply=lambda p: "70")
    assert query_model("hello", url=judge.url, retries=1, backoff=0.0) == "70"
    judge.set(behaviour="cut")
    with pytest.raises(JudgeError, match="before it was complete"):
        query_model("hello", url=judge.url, retries=1, backoff=0.0)


def test_non_json_reply_is_a_clear_error(judge):
    judge.set(behaviour="html")
    with pytest.raises(JudgeError, match="not JSON"):
        query_model("hello", url=judge.url)


# ---- scoring runs: None kept in place, resume without duplicates

def test_unscored_replies_are_none_in_place_and_counted(judge):
    judge.set(reply=lambda p: "90" if "number 1." in p else "no idea")
    scores = generate_model_scores(_data(3), "model_response", url=judge.url, progress=False)
    assert scores == [None, 90, None]
    summary = score_summary(scores)
    assert summary["scored"] == 1 and summary["unscored"] == 2 and summary["mean"] == 90
    assert summary["mean_if_zero"] == 30


def test_interrupted_run_resumes_without_duplicates(judge, tmp_path):
    data, path, k = _data(6), tmp_path / "scores.jsonl", 4
    judge.set(reply=lambda p: str(10 + len(judge.requests)),
              behaviour=lambda n, body: "ok" if n <= k else "503")
    with pytest.raises(JudgeError, match="HTTP 503"):
        generate_model_scores(data, "model_response", url=judge.url, results_path=path, progress=False,
                              retries=0)
    assert len(path.read_text().splitlines()) == 1 + k      # header + the k replies that arrived
    first = [r["content"] for b in judge.requests[:k] for r in b["messages"]]

    judge.set(behaviour="ok")
    asked_before = len(judge.requests)
    scores = generate_model_scores(data, "model_response", url=judge.url, results_path=path, progress=False)
    resumed = [b["messages"][0]["content"] for b in judge.requests[asked_before:]]
    assert len(resumed) == len(data) - k and not set(resumed) & set(first)    # finished items not asked again
    assert scores[:k] == [11, 12, 13, 14] and all(isinstance(s, int) for s in scores)
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert sorted(r["index"] for r in records) == list(range(len(data)))     # one line per item

    asked_before = len(judge.requests)                      # a third run asks nothing and returns the same
    assert generate_model_scores(data, "model_response", url=judge.url, results_path=path, progress=False) == scores
    assert len(judge.requests) == asked_before


def test_server_that_dies_mid_run_resumes_on_another(make_judge, tmp_path):
    data, path, k = _data(5), tmp_path / "scores.jsonl", 2
    first = make_judge()
    first.set(behaviour=lambda n, body: "ok" if n <= k else "die")
    with pytest.raises(JudgeUnavailableError):
        generate_model_scores(data, "model_response", url=first.url, results_path=path, progress=False,
                              backoff=0.01, timeout=5)
    assert len(first.requests) == k + 1                    # k answered, then the one it died on
    second = make_judge()
    assert generate_model_scores(data, "model_response", url=second.url, results_path=path,
                                 progress=False) == [85] * 5
    assert len(second.requests) == len(data) - k


def test_half_written_last_line_is_dropped_and_redone(judge, tmp_path):
    data, path = _data(3), tmp_path / "scores.jsonl"
    generate_model_scores(data, "model_response", url=judge.url, results_path=path, progress=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])          # killed while writing item 2
    asked_before = len(judge.requests)
    assert generate_model_scores(data, "model_response", url=judge.url, results_path=path,
                                 progress=False) == [85] * 3
    assert len(judge.requests) - asked_before == 1
    assert len(path.read_text().splitlines()) == 4


def test_results_file_of_another_run_is_refused(judge, tmp_path):
    path = tmp_path / "scores.jsonl"
    generate_model_scores(_data(2), "model_response", url=judge.url, results_path=path, progress=False)
    with pytest.raises(JudgeError, match="another run"):
        generate_model_scores(_data(2), "model_response", model="other", url=judge.url, results_path=path,
                              progress=False)
    changed = _data(2)
    changed[1]["model_response"] = "something else"
    with pytest.raises(JudgeError, match="data changed"):
        generate_model_scores(changed, "model_response", url=judge.url, results_path=path, progress=False)


# ---- bad input, refused before anything is sent

def test_bad_input_is_refused_before_any_request(judge):
    data = _data(3)
    del data[1]["model_response"]
    with pytest.raises(JudgeInputError, match="entry 1 has no string 'model_response'"):
        generate_model_scores(data, "model_response", url=judge.url, progress=False)
    with pytest.raises(JudgeInputError, match="empty"):
        generate_model_scores([], "model_response", url=judge.url, progress=False)
    with pytest.raises(JudgeInputError, match="list"):
        generate_model_scores({"a": 1}, "model_response", url=judge.url, progress=False)
    assert judge.requests == []


def test_judge_prompt_holds_task_reference_and_answer():
    entry = {"instruction": "Name a colour.", "input": "", "output": "Blue.", "model 1 response": "Red."}
    prompt = judge_prompt(entry, "model 1 response")
    assert "Name a colour." in prompt and "Blue." in prompt and "Red." in prompt
    assert "0 for useless, 100 for perfect" in prompt and "nothing else" in prompt
    # the course's own request, not the book's sentence
    assert "on a scale from 0 to 100, where 100 is the best score" not in prompt
    assert "Respond with the integer number only" not in prompt


@pytest.mark.parametrize("reply, expected", [
    ("85", 85), (" 0 ", 0), ("100", 100), ("Score: 85", 85), ("I'd give it 85.", 85), ("85/100", 85),
    ("85 out of 100", 85), ("Score: 85 (on a scale from 0 to 100)", 85), ("85%", 85),
    ("101", None), ("-5", None), ("85.5", None), ("80 or 90", None), ("", None), (None, None), ("great", None)])
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


# ---- correlations on known cases

def test_pearson_known_cases():
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 38 / 3))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_spearman_and_ranks_known_cases():
    assert rank_average([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1)
    # ranks x (1, 2, 3), y (1, 3, 2): d = (0, -1, 1), rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([10, 20, 30], [5, 9, 7]) == pytest.approx(0.5)


def test_kendall_known_cases():
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))     # tau-b with a tie


def test_correlations_refuse_unpaired_or_missing_scores():
    with pytest.raises(ValueError, match="same length"):
        spearman(list(range(100)), list(range(99)))
    with pytest.raises(ValueError, match="missing"):
        kendall_tau([1, None, 3], [1, 2, 3])


def test_correlations_match_scipy_where_installed():
    st = pytest.importorskip("scipy.stats")
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, 50)                             # many ties
    y = x + rng.integers(-3, 4, 50)
    assert pearson(x, y) == pytest.approx(st.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(st.spearmanr(x, y)[0])
    assert kendall_tau(x, y) == pytest.approx(st.kendalltau(x, y)[0])


# ---- ROUGE-L on known cases

def test_rouge_l_known_cases():
    assert rouge_tokens("The cat, the MAT!") == ["the", "cat", "the", "mat"]
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0
    r = rouge_l("the cat sat on the mat", "The cat is on the mat.")
    assert r["precision"] == pytest.approx(5 / 6) and r["recall"] == pytest.approx(5 / 6)
    r = rouge_l("Paris", "The capital of France is Paris.")
    assert r["precision"] == 1 and r["recall"] == pytest.approx(1 / 6) and r["f1"] == pytest.approx(2 / 7)
    assert rouge_l("identical words", "Identical words.")["f1"] == 1
    assert rouge_l("", "anything")["f1"] == 0 and rouge_l("nothing shared", "at all")["f1"] == 0
