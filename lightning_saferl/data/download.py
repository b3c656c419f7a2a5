"""Locate a DSRL dataset file: an explicit path, the local cache, or a verified download into the cache.

The cache directory is the one DSRL uses: ``$DSRL_DATASET_DIR`` if set, else ``~/.dsrl/datasets``; files are
named as the last component of their URL, so datasets already fetched by the ``dsrl`` package are reused.

Downloads go through ``pooch``: each attempt streams into its own temporary file in the cache folder (so two
processes or nodes fetching the same file never write to one name), is checked, then renamed onto the final
name in one step (a reader sees no file or the whole file). A short body (fewer bytes than Content-Length),
a connection error or an HTTP 5xx/429 is retried ``retries`` times, after ``backoff * 2**k`` seconds.

Integrity (sha256): the expected hash is ``TaskSpec.sha256`` when the registry has one, else the hash recorded
next to the file at its first download or first use (``<file>.sha256``, ``sha256sum`` format; trusted on
first use). Downloads and cached files are checked against it; a mismatch is refused, naming both hashes.
Checking a cached file reads it once per process (measured ~0.9 s per 300 MB on a loaded 2-core machine).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Union

from lightning_saferl.data.format import DatasetError, check_file
from lightning_saferl.data.tasks import DSRL_URL_BASE, TaskSpec

__all__ = ["file_sha256", "dsrl_dataset_dir", "resolve_dataset", "download_file", "mirror_base", "dataset_url",
           "HF_DSRL_REPO"]

_CHUNK = 1 << 20
#: Hugging Face dataset repo mirroring DSRL's files under their DSRL names (pointed to by DSRL's maintainers
#: in liuzuxin/DSRL issue #21 while data.offline-saferl.org was down); ``hf:<owner>/<repo>`` picks another.
HF_DSRL_REPO = "YYY-45/DSRL"
MIRRORS = ("dsrl", "huggingface", "hf:<owner>/<repo>", "http(s)://<base url>/")

_hash_memo: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash a file once a process


def dsrl_dataset_dir() -> Path:
    """``$DSRL_DATASET_DIR`` if set, else ``~/.dsrl/datasets`` (not created here)."""
    env = os.environ.get("DSRL_DATASET_DIR")
    return Path(env).expanduser() if env else Path("~/.dsrl/datasets").expanduser()


def mirror_base(mirror: str = "dsrl") -> str:
    """Base URL (ending in '/') of a mirror: ``dsrl`` (DSRL's server), ``huggingface`` (the dataset repo
    `HF_DSRL_REPO` on ``$HF_ENDPOINT``, default https://huggingface.co), ``hf:<owner>/<repo>``, or a base URL."""
    if mirror == "dsrl":
        return DSRL_URL_BASE
    if mirror == "huggingface" or (mirror.startswith("hf:") and mirror.count("/") == 1):
        repo = HF_DSRL_REPO if mirror == "huggingface" else mirror[3:]
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/datasets/{repo}/resolve/main/"
    if mirror.startswith(("http://", "https://")):
        return mirror if mirror.endswith("/") else mirror + "/"
    raise DatasetError(f"unknown data mirror {mirror!r}; choose one of {', '.join(MIRRORS)}")


def dataset_url(task_spec: TaskSpec, mirror: str = "dsrl") -> str:
    """URL of the task's dataset file on ``mirror`` (see `mirror_base`)."""
    return mirror_base(mirror) + task_spec.dataset_file


class _Truncated(Exception):
    pass


def _incomplete_read(err: BaseException):
    """urllib3's IncompleteRead (bytes read, bytes still expected) inside requests' ChunkedEncodingError."""
    from urllib3.exceptions import IncompleteRead

    for arg in err.args:
        if isinstance(arg, IncompleteRead):
            return arg
        if isinstance(arg, BaseException):
            found = _incomplete_read(arg)
            if found is not None:
                return found
    return None


class _Fetch:
    """pooch downloader: pooch's HTTP transfer with a progress bar; a body shorter than its Content-Length
    raises _Truncated."""

    def __init__(self, name: str, timeout: float, progress: bool):
        self.name, self.timeout, self.progress = name, timeout, progress

    def __call__(self, url: str, output_file: str, pooch_obj) -> None:
        import pooch
        import requests
        from tqdm.auto import tqdm

        # total=1: pooch uses a bar only if it is truthy, then sets its total to Content-Length (0 if absent)
        with tqdm(total=1, unit="B", unit_scale=True, desc=self.name, disable=not self.progress) as bar:
            http = pooch.HTTPDownloader(progressbar=bar, chunk_size=_CHUNK, timeout=self.timeout)
            try:
                http(url, output_file, pooch_obj)
            except requests.exceptions.ChunkedEncodingError as err:  # connection closed before the end
                short = _incomplete_read(err)
                if short is None:
                    raise
                got, expected = short.partial, short.partial + short.expected
                raise _Truncated(f"truncated: expected {expected} bytes, got {got}") from err
            got, expected = os.path.getsize(output_file), bar.total  # where the transport does not enforce it
            if expected and got != expected:
                raise _Truncated(f"truncated: expected {expected} bytes, got {got}")


def _transient(err: BaseException) -> bool:
    """Whether another attempt may help: connection errors, timeouts, short bodies, HTTP 5xx and 429."""
    import requests

    if isinstance(err, requests.HTTPError):
        status = err.response.status_code if err.response is not None else 0
        return status >= 500 or status == 429
    return isinstance(err, (requests.ConnectionError, requests.Timeout, _Truncated))


def file_sha256(path: Union[str, Path]) -> str:
    """The sha256 hex digest of a file, computed once per (path, size, mtime) in a process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        import pooch

        _hash_memo[key] = pooch.file_hash(str(path), alg="sha256")
    return _hash_memo[key]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded_sha256(path: Path) -> Optional[str]:
    side = _sidecar(path)
    return (side.read_text().split() or [None])[0] if side.exists() else None


def _record_sha256(path: Path, digest: str) -> None:
    """Write ``<path>.sha256`` atomically (own temporary file, then rename); warn if the folder is read-only."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        warnings.warn(f"{_sidecar(path)}: cannot record the dataset's sha256 ({err}); later reads are not verified")
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{digest}  {path.name}\n")
        os.replace(tmp, _sidecar(path))
    finally:
        Path(tmp).unlink(missing_ok=True)


def download_file(url: str, dest: Union[str, os.PathLike], sha256: Optional[str] = None, timeout: float = 30,
                  progress: bool = True, retries: int = 2, backoff: float = 0.5,
                  sha256_origin: str = "given") -> Path:
    """Download ``url`` to ``dest`` (see the module docstring), checked against ``sha256`` when given
    (``sha256_origin`` says where it comes from, for the error); without it, the hash of the download is
    recorded in ``<dest>.sha256``.

    Raises DatasetError naming the URL, the destination and the problem; for network failures also where to
    place the file by hand.
    """
    import pooch  # imported here, not with the package: ~0.3 s that only a download needs
    import requests

    # pooch's INFO lines address pooch's own API ("use this value as known_hash"); our bar and errors say it all
    pooch.get_logger().setLevel(logging.WARNING)
    dest = Path(dest)
    for attempt in range(retries + 1):
        try:
            pooch.retrieve(url, known_hash=None if sha256 is None else f"sha256:{sha256}", fname=dest.name,
                           path=dest.parent, downloader=_Fetch(dest.name, timeout, progress))
            break
        except (requests.RequestException, _Truncated, ValueError, OSError) as err:
            if isinstance(err, ValueError) and not isinstance(err, requests.RequestException):  # pooch: hash
                raise DatasetError(f"{dest}: the file downloaded from {url} does not match the expected sha256 "
                                   f"({sha256_origin}): {err}") from err
            if _transient(err) and attempt < retries:
                time.sleep(backoff * 2 ** attempt)
                continue
            tries = f" after {attempt + 1} attempts" if attempt else ""
            raise DatasetError(
                f"{dest}: could not download the dataset from {url}{tries} ({err}). If this machine is "
                f"offline, fetch the file elsewhere and place it at {dest} (or set DSRL_DATASET_DIR to the folder "
                f"holding it, or pass its path explicitly)") from err
    if sha256 is None:
        _record_sha256(dest, file_sha256(dest))
    return dest


def _check_cached(path: Path, expected: Optional[str], origin: str) -> Path:
    """Compare a cached file's sha256 with ``expected``; record it when nothing is expected yet."""
    got = file_sha256(path)
    if expected is None:
        _record_sha256(path, got)
    elif got != expected:
        raise DatasetError(f"{path}: sha256 mismatch: expected {expected} ({origin}), got {got}; the file is "
                           "corrupt or was replaced: delete it to download it again")
    return path


def resolve_dataset(task_spec: TaskSpec, path: Optional[Union[str, os.PathLike]] = None, download: bool = True,
                    timeout: float = 30, url: Optional[str] = None, progress: bool = True, mirror: str = "dsrl",
                    retries: int = 2, backoff: float = 0.5) -> Path:
    """Path of the task's dataset file: ``path`` if given (must exist; not hash-checked); else the cached file
    ``dsrl_dataset_dir() / task_spec.dataset_file`` (hash-checked); else downloaded from ``url`` (default: the
    file on ``mirror``, see `mirror_base`).
    """
    if path is not None:
        return check_file(path)
    if task_spec.dataset_file is None:
        raise DatasetError(f"task {task_spec.task_id!r} has no published dataset file; pass a dataset path")
    cached = dsrl_dataset_dir() / task_spec.dataset_file
    expected, origin = task_spec.sha256, "task registry"
    if expected is None:
        expected = _recorded_sha256(cached)
        origin = f"recorded in {_sidecar(cached)} when the file was first downloaded or used; delete it to accept another version"
    if cached.exists():
        return _check_cached(cached, expected, origin)
    url = url or dataset_url(task_spec, mirror)
    if not download:
        raise DatasetError(f"{cached}: dataset for {task_spec.task_id!r} not found and download=False; "
                           f"download {url} and place it at {cached} (or set DSRL_DATASET_DIR, or pass a path)")
    return download_file(url, cached, sha256=expected, timeout=timeout, progress=progress, retries=retries,
                         backoff=backoff, sha256_origin=origin)
