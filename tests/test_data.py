"""The corpus loader: the Debian source, the Gutenberg source against a local HTTP server, the
cache, and errors; the atomic file writes every module uses."""

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from minillm import data
from minillm.data import (
    NOVELS,
    CorpusUnavailable,
    atomic_write,
    atomic_write_text,
    load_corpus,
    load_novels,
    strip_gutenberg,
    train_val_split,
)


def _ebook(title: str, body: str) -> bytes:
    t = (
        f"\ufeffThe Project Gutenberg eBook of {title}\r\n\r\n"
        "This eBook is for the use of anyone...\r\n\r\n"
        f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\r\n\r\n"
        f"{title.upper()}\r\n\r\n{body}\r\n\r\n"
        f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\r\n\r\n"
        "Section 1. General Terms of Use\r\n"
    )
    return t.encode("utf-8")


@pytest.fixture
def gutenberg(tmp_path):
    """A fake Project Gutenberg on 127.0.0.1 serving the six e-books; yields (base_url, requested
    paths)."""
    files = {
        f"/cache/epub/{gid}/pg{gid}.txt": _ebook(
            title, f"By Jane Austen\r\n\r\nChapter 1\r\n\r\nIt is a truth of {key}."
        )
        for key, title, _, gid in NOVELS
    }
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", seen, files
    srv.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MINILLM_JANEAUSTENR", raising=False)
    return tmp_path / "cache"


def test_gutenberg_source_strips_licence_and_caches(gutenberg, cache, monkeypatch):
    url, seen, _ = gutenberg
    monkeypatch.setenv("MINILLM_GUTENBERG_URL", url)
    novels = load_novels("gutenberg")
    assert list(novels) == [k for k, *_ in NOVELS] and len(seen) == 6
    assert novels["emma"] == "EMMA\n\nBy Jane Austen\n\nChapter 1\n\nIt is a truth of emma."
    assert (cache / "austen-gutenberg.json").exists()
    # second call: from the cache, no request
    assert load_novels("gutenberg") == novels and len(seen) == 6
    assert load_corpus("gutenberg").count("\n\n\n") == 5


def test_gutenberg_wrong_book_refused(gutenberg, cache, monkeypatch):
    url, _, files = gutenberg
    # Emma's id serves another book
    files["/cache/epub/158/pg158.txt"] = _ebook("Persuasion", "By Jane Austen")
    monkeypatch.setenv("MINILLM_GUTENBERG_URL", url)
    with pytest.raises(CorpusUnavailable, match="Emma"):
        load_novels("gutenberg")
    assert not (cache / "austen-gutenberg.json").exists()


def test_strip_gutenberg_needs_markers():
    with pytest.raises(ValueError, match="Emma: no Project Gutenberg START/END markers"):
        strip_gutenberg("<html>503 Service Unavailable</html>", "Emma")


def test_nothing_reachable_names_both_ways(cache, monkeypatch):
    # discard port: connection refused
    monkeypatch.setenv("MINILLM_GUTENBERG_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(
        data,
        "novels_from_debian",
        lambda: (_ for _ in ()).throw(CorpusUnavailable("apt-get failed")),
    )
    with pytest.raises(CorpusUnavailable) as e:
        load_novels()
    msg = str(e.value)
    assert (
        "MINILLM_GUTENBERG_URL" in msg and "r-cran-janeaustenr" in msg and "apt-get failed" in msg
    )


def test_corrupt_cache_is_refetched(gutenberg, cache, monkeypatch):
    url, seen, _ = gutenberg
    monkeypatch.setenv("MINILLM_GUTENBERG_URL", url)
    cache.mkdir(parents=True)
    (cache / "austen-gutenberg.json").write_text('{"novels": {"emma": "trunc')
    assert load_novels("gutenberg")["emma"].startswith("EMMA") and len(seen) == 6
    json.loads((cache / "austen-gutenberg.json").read_text())  # rewritten whole


def test_bad_source_and_split_arguments():
    with pytest.raises(ValueError, match="source='web'"):
        load_novels("web")
    with pytest.raises(ValueError, match="val_frac=1.5"):
        train_val_split("abc", 1.5)


def test_debian_source_real_corpus():
    """The real corpus from the Debian package (cached by `make corpus`): six novels, 4,025,037
    characters."""
    try:
        novels = load_novels("debian")
    except CorpusUnavailable as e:
        pytest.skip(f"Debian package not reachable: {e}")
    text = load_corpus("debian")
    assert len(text) == 4_025_037 and len(set(text)) == 81
    assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    train, val = train_val_split(text)
    assert train + val == text and len(val) == 402_504


def test_read_janeaustenr_from_unpacked_package(tmp_path, monkeypatch):
    "A .deb unpacked by hand (or its data/ directory) is accepted through MINILLM_JANEAUSTENR."
    import shutil
    import subprocess

    if shutil.which("apt-get") is None:
        pytest.skip("not Debian")
    r = subprocess.run(
        ["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp_path, capture_output=True
    )
    if r.returncode:
        pytest.skip("apt-get download not possible here")
    deb = next(tmp_path.glob("*.deb"))
    subprocess.run(["dpkg-deb", "-x", deb, tmp_path / "x"], check=True)
    novels = data.novels_from_debian(tmp_path / "x")
    assert len(data.SEPARATOR.join(novels.values())) == 4_025_037
    rdb = tmp_path / "x" / data.JANEAUSTENR_DATA / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="Rdata.rdb: object 'sensesensibility' is corrupt"):
        data.novels_from_debian(tmp_path / "x")


def test_atomic_write_str_bytes_and_parts(tmp_path):
    p = tmp_path / "sub" / "a.txt"  # the directory is made
    assert atomic_write(p, "Émile\n") == p and p.read_bytes() == "Émile\n".encode("utf-8")
    atomic_write(p, b"\x00\xff")
    assert p.read_bytes() == b"\x00\xff"
    atomic_write(p, (bytes([i]) * 2 for i in range(3)))  # an iterable of bytes, written as it comes
    assert p.read_bytes() == b"\x00\x00\x01\x01\x02\x02"
    assert atomic_write_text(p, "x") == p and p.read_text() == "x"
    with pytest.raises(TypeError, match="needs a str"):
        atomic_write_text(p, b"x")
    assert sorted(f.name for f in p.parent.iterdir()) == ["a.txt"]  # no temporary files left


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write(p, b"old")

    def parts():
        yield b"new, half"
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(p, parts())
    assert p.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["a.bin"]
    with pytest.raises(TypeError):
        atomic_write(p, ["not bytes"])
    assert p.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["a.bin"]


def test_debian_source_without_rdata_names_the_extra(cache, monkeypatch, tmp_path):
    "rdata (with pandas and xarray) is the optional extra minillm[debian]; without it, one message."
    monkeypatch.setitem(sys.modules, "rdata", None)  # `import rdata` raises ImportError
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: pytest.fail("tried to download without rdata")
    )
    with pytest.raises(CorpusUnavailable, match=r"pip install 'minillm\[debian\]'"):
        data.novels_from_debian(tmp_path)
    # refused: no Gutenberg either
    monkeypatch.setenv("MINILLM_GUTENBERG_URL", "http://127.0.0.1:9")
    with pytest.raises(CorpusUnavailable, match=r"- debian: .*pip install 'minillm\[debian\]'"):
        load_novels()
    with pytest.raises(CorpusUnavailable, match=r"minillm\[debian\]"):
        load_novels("debian")


def test_rdata_is_an_optional_extra():
    "pyproject: rdata is not a dependency of minillm, it is the extra `debian` (and in `dev`)."
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("rdata") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("rdata") for d in extras["debian"])
    assert any(d.startswith("rdata") for d in extras["dev"])
