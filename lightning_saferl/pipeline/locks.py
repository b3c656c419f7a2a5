"""The locks of a run directory: `.pipeline.lock` while a pipeline runs, `<stage>/.stage.lock` while a stage trains
(in the pipeline's process or a worker). Lock files are never written through a link."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path
from typing import Callable

from lightning_saferl.errors import InputError
from lightning_saferl.pipeline.plan import Plan

def _open_lock_file(path: Path):
    """`path` opened for reading and writing, created if missing, never through a link: a symbolic link there (or a
    file with other hard links, or not a regular file) is refused, so a lock cannot be made to truncate another file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise InputError(f"{path} is a symbolic link; a lock file is never written through a link: remove the "
                         "link and rerun") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise InputError(f"{path} is not a regular file of its own ({info.st_nlink} hard links); a lock file is "
                         "never written into another file: remove it and rerun")
    return os.fdopen(fd, "r+")


@contextlib.contextmanager
def _file_lock(path: Path, busy: Callable[[str], str]):
    """Hold an OS file lock on `path` (released when the process ends, however it ends), writing this process into
    it; if another process holds it, InputError(`busy(what the holder wrote)`) at once. Under DDP every rank runs
    the pipeline: only the first process (rank 0 of node 0) takes locks. Not POSIX: no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    ranks = [int(os.environ.get(key) or 0) for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")]
    if fcntl is None or any(ranks):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_lock_file(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise InputError(busy(handle.read().strip() or "another process")) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def exclusive(run_dir: Path):
    """Hold `<run_dir>/.pipeline.lock` (`_file_lock`), so that two pipelines never train into one run directory;
    a second one stops at once naming the holder."""
    return _file_lock(run_dir / ".pipeline.lock", lambda holder: f"{run_dir} is in use by another pipeline "
                      f"({holder}); wait for it to finish or use another --run_dir")


def stage_lock(stage_dir: Path):
    """Hold `<stage_dir>/.stage.lock` while the stage trains (in this process or a worker): a worker that outlives
    its pipeline still holds it, and no other pipeline trains the stage meanwhile (`refuse_held_stages`)."""
    return _file_lock(stage_dir / ".stage.lock", lambda holder: f"stage '{stage_dir.name}' of {stage_dir.parent} is "
                      f"still being trained by {holder}, a stage worker whose pipeline ended; wait for it to stop (it "
                      "saves its last.ckpt) or end it, then rerun the same command")


def refuse_held_stages(plan: Plan) -> None:
    """InputError naming the holder if a stage of the run directory is still being trained by another process."""
    for name in plan.names:
        if (plan.run_dir / name / ".stage.lock").exists():
            with stage_lock(plan.run_dir / name):
                pass
