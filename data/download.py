"""Corpus files fetched on first use: a file of the data config that the corpora folder does not hold is downloaded
once, verified, kept in a cache folder and then read exactly like a file of the corpora folder.

    data.download.url   a mirror laid out like the corpora folder (<url>/multi30k/train.en.gz, ...), e.g. an HTTP
                        server in front of a copy of it; null (the default): $AIAYN_DATA_URL if set, else each
                        file's public source in SOURCES below (read here, not in the config, so that a run's
                        settings do not change with the environment it runs in)
    data.download.dir   where fetched files are kept, under their corpora-relative names (default:
                        <output_dir>/corpora); a file there is reused, never fetched twice

Which files have a public source (SOURCES): Multi30k Task 1 En-De, the raw files of the dataset authors' own
repository (github.com/multi30k/dataset, data/task1/raw/, at a fixed commit), byte for byte the files of the
project's corpora folder (../shared/data/README.md), each checked against its size and sha256 before it is kept.
A file fetched from a mirror that SOURCES does not know is checked to decompress to its end (a .gz file) and not
to be empty.

Every fetch is bounded: a socket timeout ($AIAYN_DOWNLOAD_TIMEOUT, 30 s) and at most the expected size (or
MAX_BYTES) read. The bytes go to a temporary file beside the target that is renamed into place only once verified
(data/atomic.py); concurrent processes (DDP ranks) wait on a file lock, and the one that comes second finds the
file there.

Offline: with HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or AIAYN_OFFLINE set to 1, the public sources are never
contacted (an explicitly configured mirror still is: it is usually on the local network); a missing file is then
an error saying where to put it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from filelock import FileLock

from data.atomic import atomic_write

MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
MULTI30K_URL = f"https://raw.githubusercontent.com/multi30k/dataset/{MULTI30K_COMMIT}/data/task1/raw/"
OFFLINE_VARIABLES = ("AIAYN_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TIMEOUT_S = 30.0  # per socket operation (connect, each read); $AIAYN_DOWNLOAD_TIMEOUT overrides
MAX_BYTES = 1 << 30  # a file a mirror serves that SOURCES does not know: more than this is not a corpus file
CHUNK = 1 << 20
LOCK_NAME = ".download.lock"  # in the cache folder: one process downloads at a time, the others then find the file


@dataclass(frozen=True)
class PublicFile:
    """Where one corpus file can be fetched from, and the bytes it must have."""

    url: str
    size: int
    sha256: str


def _multi30k(name: str, size: int, sha256: str) -> tuple[str, PublicFile]:
    return f"multi30k/{name}", PublicFile(MULTI30K_URL + name, size, sha256)


# corpora-relative path -> its public source (sizes and sha256 as in ../shared/data/README.md)
SOURCES: dict[str, PublicFile] = dict(
    [
        _multi30k("train.en.gz", 568929, "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
        _multi30k("train.de.gz", 637044, "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6"),
        _multi30k("val.en.gz", 21650, "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28"),
        _multi30k("val.de.gz", 24681, "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a"),
        _multi30k("test_2016_flickr.en.gz", 21077, "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9"),
        _multi30k("test_2016_flickr.de.gz", 22890, "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8"),
    ]
)


class DownloadError(Exception):
    """A corpus file could not be fetched or verified; the message says what failed (one line)."""


def offline_reason() -> str | None:
    """'HF_HUB_OFFLINE=1' (the first offline variable set to a true value), or None when downloads are allowed."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]}"
    return None


def _timeout() -> float:
    return float(os.environ.get("AIAYN_DOWNLOAD_TIMEOUT") or TIMEOUT_S)


def mirror_url(configured: str | None) -> str | None:
    """The mirror to fetch from: data.download.url, else $AIAYN_DATA_URL, else None (the public sources)."""
    return configured or os.environ.get("AIAYN_DATA_URL") or None


def can_download(relative: str, mirror: str | None) -> bool:
    """Whether `relative` (a corpora-relative path) has somewhere to come from: a mirror, or a public source."""
    return bool(mirror) or relative in SOURCES


def source_url(relative: str, mirror: str | None) -> str:
    if mirror:
        return mirror.rstrip("/") + "/" + quote(relative)
    return SOURCES[relative].url


def cached_path(relative: str, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).expanduser() / PurePosixPath(relative)


def fetch(relative: str, cache_dir: str | os.PathLike, mirror: str | None = None) -> Path:
    """The corpus file `relative` (e.g. "multi30k/train.en.gz") from the cache folder, downloaded there first if it is
    not yet. Raises DownloadError (one line: what failed) when it cannot be had."""
    relative = PurePosixPath(relative).as_posix()
    if relative.startswith("../") or relative.startswith("/") or "/../" in relative:
        raise DownloadError(f"{relative}: not a path inside the corpora folder, so not downloaded")
    known = SOURCES.get(relative)
    path = cached_path(relative, cache_dir)
    if _usable(path, known):
        return path
    url = source_url(relative, mirror)
    if not mirror and (reason := offline_reason()):
        raise DownloadError(f"offline ({reason}): not fetching {url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(cache_dir).expanduser() / LOCK_NAME)):
        if not _usable(path, known):  # another process may have fetched it while this one waited
            _download(url, path, known)
    return path


def _usable(path: Path, known: PublicFile | None) -> bool:
    """A file already fetched: present, and of the known size (it was verified in full before it was renamed in)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    return size > 0 and (known is None or size == known.size)


def _download(url: str, path: Path, known: PublicFile | None) -> None:
    limit = known.size if known else MAX_BYTES
    size = f" ({known.size / 1e6:.2f} MB)" if known else ""
    print(f"downloading {url}{size} -> {path}", file=sys.stderr, flush=True)

    def write(out) -> None:
        digest, total = hashlib.sha256(), 0
        try:
            with urlopen(Request(url, headers={"User-Agent": "aiayn"}), timeout=_timeout()) as response:
                while chunk := response.read(CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise DownloadError(f"{url}: more than the expected {limit:,} bytes; not a copy of the file")
                    digest.update(chunk)
                    out.write(chunk)
        except HTTPError as err:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
        except (URLError, OSError, HTTPException, ValueError) as err:  # refused, no such host, timed out, cut short
            reason = err.reason if isinstance(err, URLError) else err
            raise DownloadError(f"{url}: {str(reason) or type(reason).__name__}") from None
        if known and (total, digest.hexdigest()) != (known.size, known.sha256):
            raise DownloadError(
                f"{url}: got {total:,} bytes with sha256 {digest.hexdigest()[:16]}..., expected {known.size:,} bytes "
                f"with sha256 {known.sha256[:16]}...; not the published file"
            )
        if total == 0:
            raise DownloadError(f"{url}: empty response")
        if known is None and path.name.endswith(".gz"):
            out.flush()
            try:
                with gzip.open(out.name, "rb") as f:
                    while f.read(CHUNK):
                        pass
            except (EOFError, OSError, zlib.error) as err:
                raise DownloadError(f"{url}: not a whole gzip file ({err})") from None

    atomic_write(path, write)  # renamed into place only once verified; the temporary file goes if anything raised
    checked = "sha256 verified" if known else "gzip verified" if path.name.endswith(".gz") else "no checksum known"
    print(f"downloaded {path.name}: {path.stat().st_size:,} bytes, {checked}", file=sys.stderr, flush=True)
