"""The data layer's unhappy paths: offline, corrupt mirror, interrupted or wrong download, zips, cache."""
import hashlib
import io
import socket
import urllib.error
import zipfile

import pytest

from llm_from_scratch import download
from llm_from_scratch.download import (REGISTRY, ChecksumError, DataFile, DownloadError,
                                       UnknownDataFileError, fetch, sha256_file)

from conftest import SHARED_DATA

BODY = b"It was a dark and stormy night; the tokens were restless.\n" * 200


def _register(monkeypatch, url, body=BODY, member=None, mirrors=()):
    spec = DataFile("test-file.txt", url, hashlib.sha256(body).hexdigest(), len(body), "test", member, mirrors)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    return spec


def _closed_port_url(path="/test-file.txt"):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                      # nothing listens there now: connection refused, like a dead network
    return f"http://127.0.0.1:{port}{path}"


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownDataFileError, match="the-verdict.txt"):
        fetch("the-verdikt.txt")


def test_download_verifies_and_caches(isolated_cache, local_server, monkeypatch):
    local_server.add("/f", BODY)
    _register(monkeypatch, local_server.url("/f"))
    path = fetch("test-file.txt", progress=False)
    assert path == isolated_cache / "test-file.txt" and path.read_bytes() == BODY
    # A second call is served from the cache: the server sees no new request.
    assert fetch("test-file.txt", progress=False) == path
    assert local_server.hits == ["/f"]
    assert [p.name for p in isolated_cache.iterdir()] == ["test-file.txt"]


def test_offline_error_names_file_url_and_variable(isolated_cache, monkeypatch):
    url = _closed_port_url()
    _register(monkeypatch, url)
    with pytest.raises(DownloadError) as err:
        fetch("test-file.txt", progress=False)
    msg = str(err.value)
    assert "test-file.txt" in msg and url in msg and "LLM_FROM_SCRATCH_DATA" in msg
    assert not isolated_cache.exists() or not any(isolated_cache.iterdir())


def test_no_dns_is_the_same_clear_error(isolated_cache, monkeypatch):
    _register(monkeypatch, "https://example.invalid/test-file.txt")
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(download, "_urlopen", no_network)
    with pytest.raises(DownloadError, match="LLM_FROM_SCRATCH_DATA"):
        fetch("test-file.txt", progress=False)


def test_backup_address_is_tried(isolated_cache, local_server, monkeypatch):
    local_server.add("/backup", BODY)
    _register(monkeypatch, _closed_port_url(), mirrors=(local_server.url("/backup"),))
    assert fetch("test-file.txt", progress=False).read_bytes() == BODY


def test_interrupted_download_leaves_nothing(isolated_cache, local_server, monkeypatch):
    local_server.add("/f", BODY, mode="truncate")
    _register(monkeypatch, local_server.url("/f"))
    with pytest.raises(DownloadError, match="stopped after"):
        fetch("test-file.txt", progress=False)
    assert list(isolated_cache.iterdir()) == []          # no partial file, no temp file


def test_ctrl_c_during_download_leaves_nothing(isolated_cache, monkeypatch):
    _register(monkeypatch, "http://127.0.0.1:9/test-file.txt")

    class Dying(io.BytesIO):
        headers = {"Content-Length": str(len(BODY))}
        def read(self, n=-1):
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().read(100)

    monkeypatch.setattr(download, "_urlopen", lambda url, timeout: Dying(BODY))
    with pytest.raises(KeyboardInterrupt):
        fetch("test-file.txt", progress=False)
    assert list(isolated_cache.iterdir()) == []


def test_download_with_wrong_hash_is_refused(isolated_cache, local_server, monkeypatch):
    local_server.add("/f", BODY + b"tampered")
    _register(monkeypatch, local_server.url("/f"))
    with pytest.raises(ChecksumError, match="Nothing was saved"):
        fetch("test-file.txt", progress=False)
    assert list(isolated_cache.iterdir()) == []


def test_mirror_is_used_first(isolated_cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "test-file.txt").write_bytes(BODY)
    _register(monkeypatch, _closed_port_url())         # the network would fail: the mirror must win
    monkeypatch.setenv("LLM_FROM_SCRATCH_DATA", str(mirror))
    assert fetch("test-file.txt") == mirror / "test-file.txt"


def test_corrupt_mirror_file_is_an_error_and_not_used(isolated_cache, tmp_path, local_server, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "test-file.txt").write_bytes(BODY[:-1] + b"?")
    local_server.add("/f", BODY)
    _register(monkeypatch, local_server.url("/f"))
    monkeypatch.setenv("LLM_FROM_SCRATCH_DATA", str(mirror))
    with pytest.raises(ChecksumError) as err:
        fetch("test-file.txt", progress=False)
    assert str(mirror / "test-file.txt") in str(err.value) and "LLM_FROM_SCRATCH_DATA" in str(err.value)
    assert local_server.hits == [] and not isolated_cache.exists()


def test_corrupt_cache_file_is_replaced(isolated_cache, local_server, monkeypatch):
    local_server.add("/f", BODY)
    _register(monkeypatch, local_server.url("/f"))
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "test-file.txt").write_bytes(b"old junk")
    assert fetch("test-file.txt", progress=False).read_bytes() == BODY


def test_download_false_never_touches_the_network(isolated_cache, local_server, monkeypatch):
    local_server.add("/f", BODY)
    _register(monkeypatch, local_server.url("/f"))
    with pytest.raises(DownloadError, match="download=False"):
        fetch("test-file.txt", download=False)
    assert local_server.hits == []


def test_zip_member_is_extracted(isolated_cache, local_server, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme", b"about the data")
        zf.writestr("test-member", BODY)
    local_server.add("/data.zip", buf.getvalue())
    _register(monkeypatch, local_server.url("/data.zip"), member="test-member")
    path = fetch("test-file.txt", progress=False)
    assert path.read_bytes() == BODY
    assert [p.name for p in isolated_cache.iterdir()] == ["test-file.txt"]   # the zip itself is not kept


def test_zip_without_member_is_a_clear_error(isolated_cache, local_server, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("other", BODY)
    local_server.add("/data.zip", buf.getvalue())
    _register(monkeypatch, local_server.url("/data.zip"), member="test-member")
    with pytest.raises(DownloadError, match="test-member"):
        fetch("test-file.txt", progress=False)
    assert list(isolated_cache.iterdir()) == []


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no ../shared/data mirror beside this checkout")
def test_every_registered_file_matches_the_mirror(isolated_cache, monkeypatch):
    monkeypatch.setenv("LLM_FROM_SCRATCH_DATA", str(SHARED_DATA))
    for name, spec in REGISTRY.items():
        path = fetch(name, download=False)
        assert path.stat().st_size == spec.size, name
        assert sha256_file(path) == spec.sha256, name
