"""Corpus files fetched on first use (data/download.py), against an HTTP server on 127.0.0.1 in a thread: never the
network. The server serves a copy of the corpora folder's Multi30k files twice: under raw/ as the public source
lays them out (data/task1/raw/<name>), and under mirror/multi30k/ as a mirror of the corpora folder."""

from __future__ import annotations

import functools
import gzip
import shutil
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import data.download
from data.download import SOURCES, PublicFile
from data.errors import CorpusFileNotFoundError
from data.prepare import prepare_dataset, resolve_data_config, split_sources
from pipeline.cli import main
from pipeline.config import load_config

TINY_FILES = ["val.en.gz", "val.de.gz", "test_2016_flickr.en.gz", "test_2016_flickr.de.gz"]  # data=tiny's


class Server:
    """A static file server on 127.0.0.1 that records every path asked for."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests = root, []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def site(tmp_path: Path, corpora_dir: Path):
    root = tmp_path / "site"
    for folder in (root / "raw", root / "mirror" / "multi30k"):
        folder.mkdir(parents=True)
        for name in TINY_FILES + ["train.en.gz"]:
            shutil.copyfile(corpora_dir / "multi30k" / name, folder / name)
    server = Server(root)
    yield server
    server.close()


@pytest.fixture
def public_at(site: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The public sources (SOURCES) moved to the local server, and downloads allowed (no offline variable)."""
    for relative, known in SOURCES.items():
        name = relative.split("/")[-1]
        monkeypatch.setitem(SOURCES, relative, PublicFile(f"{site.url}raw/{name}", known.size, known.sha256))
    for name in data.download.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return site


def tiny_cfg(corpora: Path, out: Path, *overrides: str):
    return load_config(["data=tiny", f"paths.corpora_dir={corpora}", f"paths.output_dir={out}", *overrides])


def files_of(cfg) -> dict:
    """{split: [Source]} of the config: its corpus files resolved (and fetched if need be)."""
    return split_sources(resolve_data_config(cfg.data))


def test_first_use_downloads_verifies_and_prepares_then_never_again(tmp_path, corpora_dir, public_at, capsys):
    """An empty corpora folder: data=tiny's four files come from the public source into <output_dir>/corpora, byte for
    byte the corpora folder's, and are prepared; a second prepare asks nothing; the dataset is the one prepared from
    the corpora folder itself (same fingerprint), which then needs no request either."""
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    cfg = tiny_cfg(empty, out)
    folder = prepare_dataset(cfg.data, out)
    assert sorted(public_at.requests) == sorted(f"/raw/{name}" for name in TINY_FILES)
    for name in TINY_FILES:
        assert (out / "corpora" / "multi30k" / name).read_bytes() == (corpora_dir / "multi30k" / name).read_bytes()
    assert not list((out / "corpora" / "multi30k").glob(".*.tmp-*"))
    err = capsys.readouterr().err
    assert f"downloading {public_at.url}raw/val.en.gz" in err and "sha256 verified" in err

    public_at.requests.clear()
    assert prepare_dataset(tiny_cfg(empty, out).data, out) == folder  # already prepared, from the cached files
    assert files_of(tiny_cfg(empty, out))["train"][0].files["src"] == out / "corpora/multi30k/val.en.gz"
    assert prepare_dataset(tiny_cfg(corpora_dir, out).data, out) == folder  # the same bytes: the same dataset
    assert public_at.requests == []


def test_corpora_folder_files_are_used_without_any_request(tmp_path, corpora_dir, public_at):
    cfg = tiny_cfg(corpora_dir, tmp_path / "out", f"data.download.url={public_at.url}mirror")
    sources = files_of(cfg)
    assert sources["train"][0].files["src"] == corpora_dir / "multi30k" / "val.en.gz"
    assert public_at.requests == []
    assert not (tmp_path / "out" / "corpora").exists()


def test_a_mirror_is_used_even_offline(tmp_path, site, monkeypatch):
    """data.download.url (or $AIAYN_DATA_URL): a mirror laid out like the corpora folder, asked even with
    HF_HUB_OFFLINE=1 (it was configured on purpose, e.g. on the cluster's network); a file there is still checked
    against the public file's sha256."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AIAYN_DATA_URL", f"{site.url}mirror/")
    empty = tmp_path / "empty"
    empty.mkdir()
    sources = files_of(tiny_cfg(empty, tmp_path / "out"))
    assert sources["valid"][0].files["tgt"] == tmp_path / "out" / "corpora" / "multi30k" / "test_2016_flickr.de.gz"
    assert sorted(site.requests) == sorted(f"/mirror/multi30k/{name}" for name in TINY_FILES)


def test_server_down_and_nothing_cached_is_one_line_naming_corpora_dir(tmp_path, public_at, capsys):
    public_at.close()  # nothing listens on the port any more
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "data=tiny", f"paths.corpora_dir={empty}", f"paths.output_dir={out}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"aiayn prepare: corpus file not found: {empty / 'multi30k' / 'val.en.gz'}")
    assert "CORPORA_DIR" in err and f"{public_at.url}raw/val.en.gz" in err and "refused" in err.lower()
    assert not [p for p in (out / "corpora").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_offline_never_contacts_the_public_source(tmp_path, public_at, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusFileNotFoundError) as err:
        files_of(tiny_cfg(empty, tmp_path / "out"))
    message = str(err.value)
    assert "offline (HF_DATASETS_OFFLINE=1)" in message and "CORPORA_DIR" in message and "\n" not in message
    assert public_at.requests == []


def test_a_file_that_is_not_the_published_one_is_refused_and_not_kept(tmp_path, site, public_at):
    path = site.root / "raw" / "val.en.gz"  # the file the server sends
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # the same size, other bytes
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusFileNotFoundError, match=r"sha256 .*not the published file"):
        files_of(tiny_cfg(empty, tmp_path / "out"))
    assert not [p for p in (tmp_path / "out" / "corpora").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_a_mirror_file_with_no_known_checksum_must_be_whole_gzip(tmp_path, site):
    """A file SOURCES does not know (here: another corpus on the mirror) is kept only if it decompresses to its end."""
    root = site.root
    (root / "mirror" / "other").mkdir()
    whole = gzip.compress(b"a line\n" * 1000)
    (root / "mirror" / "other" / "a.en.gz").write_bytes(whole)
    (root / "mirror" / "other" / "a.de.gz").write_bytes(whole[: len(whole) // 2])
    spec = "{src: other/a.en.gz, tgt: other/a.de.gz}"
    overrides = [f"data.download.url={site.url}mirror", "~data.splits.train", f"+data.splits.train={spec}"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusFileNotFoundError, match=r"other/a\.de\.gz: not a whole gzip file"):
        files_of(tiny_cfg(empty, tmp_path / "out", *overrides))
    assert (tmp_path / "out" / "corpora" / "other" / "a.en.gz").read_bytes() == whole
    assert not (tmp_path / "out" / "corpora" / "other" / "a.de.gz").exists()


def test_a_server_that_never_answers_times_out(tmp_path, monkeypatch):
    """Bounded: a host that accepts the connection but sends nothing fails after the socket timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # connections complete in the backlog; nothing ever reads or answers them
    try:
        monkeypatch.setenv("AIAYN_DOWNLOAD_TIMEOUT", "0.5")
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        empty = tmp_path / "empty"
        empty.mkdir()
        start = time.monotonic()
        with pytest.raises(CorpusFileNotFoundError, match="timed out"):
            files_of(tiny_cfg(empty, tmp_path / "out", f"data.download.url={url}"))
        assert time.monotonic() - start < 10
    finally:
        listener.close()


def test_processes_fetching_at_once_download_once(tmp_path, public_at):
    """DDP ranks resolving the corpus at the same moment: one downloads, the others wait on the lock and find it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: data.download.fetch("multi30k/train.en.gz", tmp_path / "cache"), range(4)))
    assert set(paths) == {tmp_path / "cache" / "multi30k" / "train.en.gz"}
    assert public_at.requests == ["/raw/train.en.gz"]
