import collections
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import multiprocessing
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.data.download import HF_DSRL_REPO, dataset_url, dsrl_dataset_dir, resolve_dataset
from lightning_saferl.data.format import DatasetError, read_dataset, write_dataset
from lightning_saferl.data.tasks import get_task

TASK = get_task("OfflineCarCircle-v0")


def tiny_arrays(n=5):
    return {
        "observations": np.ones((n, 3)), "next_observations": np.ones((n, 3)), "actions": np.zeros((n, 2)),
        "rewards": np.arange(n, dtype=float), "costs": np.zeros(n), "terminals": np.zeros(n),
        "timeouts": np.eye(1, n, n - 1)[0],
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "dsrl_cache"
    monkeypatch.setenv("DSRL_DATASET_DIR", str(d))
    return d


@contextlib.contextmanager
def serve(handler):
    """An HTTP server on 127.0.0.1 (free port) in a thread; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with serve(functools.partial(QuietFiles, directory=str(root))) as base:
        yield root, base


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cache_dir_from_env(cache, monkeypatch):
    assert dsrl_dataset_dir() == cache
    monkeypatch.delenv("DSRL_DATASET_DIR")
    assert dsrl_dataset_dir() == Path("~/.dsrl/datasets").expanduser()


def test_cached_file_is_found_without_network(cache):
    target = write_dataset(cache / TASK.dataset_file, tiny_arrays())
    url = f"http://127.0.0.1:{closed_port()}/never.hdf5"
    assert resolve_dataset(TASK, url=url) == target
    assert resolve_dataset(TASK, download=False) == target


def test_explicit_path_wins(cache, tmp_path):
    write_dataset(cache / TASK.dataset_file, tiny_arrays())
    mine = write_dataset(tmp_path / "mine.hdf5", tiny_arrays(7))
    assert resolve_dataset(TASK, path=str(mine)) == mine
    missing = tmp_path / "missing.hdf5"
    with pytest.raises(DatasetError) as e:
        resolve_dataset(TASK, path=missing)
    assert str(e.value).startswith(str(missing)) and "does not exist" in str(e.value)


def test_download_through_local_server(cache, server, capsys):
    root, base = server
    write_dataset(root / "served.hdf5", tiny_arrays(9))
    path = resolve_dataset(TASK, url=base + "served.hdf5")
    assert path == cache / TASK.dataset_file
    assert len(read_dataset(path)) == 9
    assert sorted(p.name for p in cache.iterdir()) == [TASK.dataset_file, TASK.dataset_file + ".sha256"]
    err = capsys.readouterr().err
    assert TASK.dataset_file in err and "100%" in err  # tqdm progress bar with a known total
    # a second call uses the cache (the URL is dead now)
    assert resolve_dataset(TASK, url=f"http://127.0.0.1:{closed_port()}/x.hdf5") == path


def test_http_error_leaves_nothing(cache, server):
    _, base = server
    with pytest.raises(DatasetError, match="404"):
        resolve_dataset(TASK, url=base + "absent.hdf5")
    assert not cache.exists() or not list(cache.iterdir())


def test_offline_failure_is_quick_and_says_where_to_put_the_file(cache):
    url = f"http://127.0.0.1:{closed_port()}/SafetyCarCircle.hdf5"
    start = time.monotonic()
    with pytest.raises(DatasetError) as e:
        resolve_dataset(TASK, url=url, timeout=5)
    assert time.monotonic() - start < 5
    msg = str(e.value)
    target = cache / TASK.dataset_file
    assert url in msg and f"place it at {target}" in msg and "DSRL_DATASET_DIR" in msg
    assert not target.exists() and (not cache.exists() or not list(cache.iterdir()))


def test_download_disabled_message(cache):
    with pytest.raises(DatasetError) as e:
        resolve_dataset(TASK, download=False)
    msg = str(e.value)
    assert "download=False" in msg and TASK.url in msg and str(cache / TASK.dataset_file) in msg


def test_task_without_dataset_needs_a_path(cache):
    with pytest.raises(DatasetError, match="pass a dataset path"):
        resolve_dataset(get_task("PointRobot-v0"))


# ----------------------------------------------------------------------------- a scripted local server
class Script:
    """What the scripted server serves: ``routes[name] = dict(body=bytes, fail_first=n (503s before serving),
    extra=k (Content-Length claims k bytes more than sent), chunk_delay=s (seconds between 8 chunks))``.
    Counts GETs per name and the most responses in flight at once."""

    def __init__(self):
        self.routes, self.hits = {}, collections.Counter()
        self.lock, self.active, self.max_active = threading.Lock(), 0, 0


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    script: Script

    def log_message(self, *args):
        pass

    def do_GET(self):
        script, name = self.script, self.path.lstrip("/")
        with script.lock:
            script.hits[name] += 1
            hit = script.hits[name]
        route = script.routes.get(name)
        if route is None:
            return self.send_error(404)
        if hit <= route.get("fail_first", 0):
            return self.send_error(503)
        body = route["body"]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + route.get("extra", 0)))
        self.end_headers()
        with script.lock:
            script.active += 1
            script.max_active = max(script.max_active, script.active)
        try:
            step = -(-len(body) // 8)
            for i in range(0, len(body), step):
                self.wfile.write(body[i:i + step])
                self.wfile.flush()
                time.sleep(route.get("chunk_delay", 0))
        finally:
            with script.lock:
                script.active -= 1


@pytest.fixture
def scripted():
    script = Script()
    with serve(type("Handler", (ScriptedHandler,), {"script": script})) as base:
        yield script, base


FAST = dict(progress=False, timeout=5, backoff=0.01)  # tiny backoff: retries cost milliseconds here
BODY = bytes(range(256)) * 40  # 10240 bytes


def test_truncated_download_is_refused_retried_and_leaves_no_file(cache, scripted):
    script, base = scripted
    script.routes["short.hdf5"] = dict(body=BODY, extra=100)
    with pytest.raises(DatasetError) as e:
        resolve_dataset(TASK, url=base + "short.hdf5", retries=1, **FAST)
    msg = str(e.value)
    assert f"truncated: expected {len(BODY) + 100} bytes, got {len(BODY)}" in msg
    assert base + "short.hdf5" in msg and str(cache / TASK.dataset_file) in msg and "after 2 attempts" in msg
    assert script.hits["short.hdf5"] == 2
    assert not cache.exists() or not list(cache.iterdir())


def test_wrong_hash_is_refused_without_retry_and_leaves_no_file(cache, scripted):
    script, base = scripted
    script.routes["f.hdf5"] = dict(body=BODY)
    spec = dataclasses.replace(TASK, sha256="0" * 64)
    with pytest.raises(DatasetError) as e:
        resolve_dataset(spec, url=base + "f.hdf5", retries=3, **FAST)
    msg = str(e.value)
    assert "0" * 64 in msg and hashlib.sha256(BODY).hexdigest() in msg and base + "f.hdf5" in msg
    assert script.hits["f.hdf5"] == 1  # a different file will not become the expected one by asking again
    assert not cache.exists() or not list(cache.iterdir())
    # the registry hash that matches is accepted
    good = dataclasses.replace(TASK, sha256=hashlib.sha256(BODY).hexdigest())
    assert resolve_dataset(good, url=base + "f.hdf5", **FAST).read_bytes() == BODY


def test_server_failing_twice_then_succeeding_gives_a_good_file(cache, scripted):
    script, base = scripted
    script.routes["flaky.hdf5"] = dict(body=BODY, fail_first=2)
    with pytest.raises(DatasetError, match="503.*after 2 attempts|after 2 attempts.*503"):
        resolve_dataset(TASK, url=base + "flaky.hdf5", retries=1, **FAST)  # one retry is not enough
    script.hits.clear()
    path = resolve_dataset(TASK, url=base + "flaky.hdf5", retries=2, **FAST)
    assert script.hits["flaky.hdf5"] == 3 and path.read_bytes() == BODY
    digest = hashlib.sha256(BODY).hexdigest()
    assert (cache / (TASK.dataset_file + ".sha256")).read_text() == f"{digest}  {TASK.dataset_file}\n"


def test_hash_recorded_at_first_download_guards_later_reads_and_downloads(cache, scripted):
    script, base = scripted
    script.routes["f.hdf5"] = dict(body=BODY)
    path = resolve_dataset(TASK, url=base + "f.hdf5", **FAST)
    recorded = hashlib.sha256(BODY).hexdigest()
    assert resolve_dataset(TASK, **FAST) == path  # unchanged file: accepted from the cache
    path.write_bytes(BODY[:-1] + b"x")  # corrupted in place
    with pytest.raises(DatasetError) as e:
        resolve_dataset(TASK, **FAST)
    msg = str(e.value)
    assert msg.startswith(str(path)) and recorded in msg and hashlib.sha256(path.read_bytes()).hexdigest() in msg
    path.unlink()  # deleted: the next download must match the recorded hash too
    script.routes["f.hdf5"] = dict(body=BODY[::-1])
    with pytest.raises(DatasetError, match=recorded):
        resolve_dataset(TASK, url=base + "f.hdf5", **FAST)
    assert not path.exists()


def _download_in_child(url, barrier, results):
    barrier.wait()
    try:
        results.put(str(resolve_dataset(TASK, url=url, **FAST)))
    except Exception as err:  # reported to the parent, which fails the test
        results.put(f"error: {err}")


def test_two_processes_downloading_at_once_both_get_the_file(cache, scripted):
    script, base = scripted
    script.routes["f.hdf5"] = dict(body=BODY, chunk_delay=0.05)  # ~0.4 s per transfer: the two overlap
    ctx = multiprocessing.get_context("fork")  # a fresh interpreter would spend seconds importing torch
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_download_in_child, args=(base + "f.hdf5", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    assert outcomes == [str(cache / TASK.dataset_file)] * 2
    assert script.hits["f.hdf5"] == 2 and script.max_active == 2  # both transfers were in flight together
    assert (cache / TASK.dataset_file).read_bytes() == BODY
    assert sorted(p.name for p in cache.iterdir()) == [TASK.dataset_file, TASK.dataset_file + ".sha256"]


def test_mirror_choices(monkeypatch):
    file = TASK.dataset_file
    assert dataset_url(TASK) == dataset_url(TASK, "dsrl") == TASK.url
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert dataset_url(TASK, "huggingface") == f"https://huggingface.co/datasets/{HF_DSRL_REPO}/resolve/main/{file}"
    assert dataset_url(TASK, "hf:me/dsrl-copy") == f"https://huggingface.co/datasets/me/dsrl-copy/resolve/main/{file}"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf.example.org/")
    assert dataset_url(TASK, "huggingface").startswith("https://hf.example.org/datasets/")
    assert dataset_url(TASK, "https://example.org/data") == f"https://example.org/data/{file}"
    for bad in ("ftp://x", "hf:no-owner", "Huggingface"):
        with pytest.raises(DatasetError, match=f"unknown data mirror '{bad}'.*huggingface"):
            dataset_url(TASK, bad)


def test_datamodule_downloads_from_the_chosen_mirror(cache, scripted, tmp_path):
    script, base = scripted
    script.routes[f"mirror/{TASK.dataset_file}"] = dict(body=write_dataset(tmp_path / "d.hdf5",
                                                                            tiny_arrays(6)).read_bytes())
    dm = OfflineDataModule(task=TASK.task_id, mirror=base + "mirror", batch_size=2, steps_per_epoch=1)
    assert dm.obs_dim is None  # not cached yet
    dm.prepare_data()
    assert script.hits[f"mirror/{TASK.dataset_file}"] == 1 and len(read_dataset(cache / TASK.dataset_file)) == 6
    with pytest.raises(DatasetError, match="unknown data mirror"):
        OfflineDataModule(task=TASK.task_id, mirror="nowhere")
