"""Shared fixtures: one torch thread per test, an isolated cache, a throw-away HTTP server on the loopback
address, and a headless Chromium for the browser tests."""
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test uses tiny tensors: one thread is faster there, and tests do not fight other processes
    (or each other) for the CPU's cores. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """An empty cache folder and no mirror: what a fresh machine sees."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_FROM_SCRATCH_CACHE", str(cache))
    monkeypatch.delenv("LLM_FROM_SCRATCH_DATA", raising=False)
    return cache


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.hits.append(self.path)
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, mode = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncate":          # announce the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):       # keep test output quiet
        pass


@pytest.fixture
def local_server():
    """Serve bytes on 127.0.0.1: `server.add('/x', b'...', mode='ok'|'truncate')`, `server.url('/x')`."""
    handler = type("H", (_Handler,), {"routes": {}, "hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    class Server:
        hits = handler.hits
        def add(self, path, body, mode="ok"):
            handler.routes[path] = (body, mode)
        def url(self, path):
            return f"http://127.0.0.1:{httpd.server_address[1]}{path}"

    try:
        yield Server()
    finally:
        httpd.shutdown()
        httpd.server_close()


# Debian's chromium (what .ci/run installs), or Google Chrome (what GitHub's runners ship).
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "",
                             shutil.which("google-chrome") or "")
                 if p and Path(p).exists()), None)
# Headless, and quiet on a machine without internet: no background requests, no updates, no sync.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole run, driven by Playwright; skips, saying why, if either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()
