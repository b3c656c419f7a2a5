"""Stages trained at once in worker processes (`--parallel_stages`): how many, the workers' share of this process's
torch threads, and workers that end with their pipeline however it ends."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Optional

import lightning as L
import torch
from tqdm import tqdm

from lightning_saferl.pipeline.plan import Plan
from lightning_saferl.pipeline.stages import train_stage
from lightning_saferl.policy import load_module

def stage_workers(plan: Plan, todo: list[str]) -> int:
    """How many stages may train at once: `parallel_stages`, at most one per torch thread of this process, and 1
    (all in this process) under a distributed launcher or when a stage trains on several devices or nodes."""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        return 1
    for name in todo:
        trainer = plan.parsed[name].trainer
        devices = trainer.get("devices", "auto")
        if str(devices) in ("auto", "-1"):  # every device of the accelerator: only GPUs come several to a machine
            count = torch.cuda.device_count() if str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") \
                else 1
        elif isinstance(devices, (list, tuple)):  # device ids
            count = len(devices)
        elif "," in str(devices):  # device ids as text: "0,1" (two), "0," (one)
            count = len([d for d in str(devices).split(",") if d.strip()])
        else:
            count = int(devices)
        if count > 1 or trainer.get("num_nodes") not in (None, 1):
            return 1
    return min(plan.cfg.parallel_stages, torch.get_num_threads())


def train_in_workers(plan: Plan, todo: list[str], workers: int,
                      command: Optional[list[str]]) -> None:
    """Train the `todo` stages in worker processes, up to `workers` at once: a stage starts when the stages it takes
    inputs from are finished. This process's torch threads are shared among the running workers, anew
    whenever one starts or ends (a worker takes its new share before its next batch): when FISOR's reward critic
    finishes, the feasibility critic trains on every core. The first failure stops the other workers (SIGTERM: they
    save last.ckpt) and is raised here; so does a SIGTERM to this process (raised as Lightning's SIGTERMException).
    Workers end with this process however it ends (`_end_with_parent`)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    running: dict[str, Any] = {}
    shares: dict[str, Any] = {}  # stage -> its worker's thread count (shared memory, read by _FollowThreadShare)
    budget = torch.get_num_threads()
    done, todo = {name for name in plan.names if name not in todo}, list(todo)
    try:
        _raise_on_sigterm()
        while todo or running:
            ready = [name for name in todo if set(plan.parsed[name].inputs.values()) <= done]
            ready = ready[:workers - len(running)]
            threads = max(1, budget // max(1, len(running) + len(ready)))
            for name in running:
                shares[name].value = threads
            for name in ready:
                todo.remove(name)
                shares[name] = context.Value("i", threads, lock=False)
                running[name] = context.Process(target=_stage_worker, args=(plan, name, command, shares[name],
                                                                            results, os.getpid()), name=f"stage-{name}")
                running[name].start()
            try:
                name, error = results.get(timeout=1.0)
            except queue.Empty:
                died = {n: p.exitcode for n, p in running.items() if p.exitcode not in (None, 0)}
                if died:
                    name, code = next(iter(died.items()))
                    raise RuntimeError(f"stage '{name}': its worker process died (exit code {code}); rerun the "
                                       f"same command to resume from its last.ckpt")
                continue
            running.pop(name).join()
            if error is not None:
                raise error
            done.add(name)
    finally:
        _restore_sigterm()  # a second SIGTERM ends this process: its workers end with it (`_end_with_parent`)
        for process in running.values():
            process.terminate()  # SIGTERM: the worker saves its last.ckpt at the end of its current step
        for process in running.values():
            process.join(WORKER_STOP_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()


#: how long a stopped stage worker may take to save its last.ckpt before it is killed
WORKER_STOP_SECONDS = 120


_sigterm_handlers: list[Any] = []


def _raise_on_sigterm() -> None:
    """Until `_restore_sigterm`: SIGTERM to this process raises Lightning's SIGTERMException (the command line
    prints how to resume), so that the pipeline's cleanup stops its workers. Only from the main thread."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stop(signum: int, frame: Any) -> None:
        raise SIGTERMException(signum)

    if threading.current_thread() is threading.main_thread():
        _sigterm_handlers.append(signal.signal(signal.SIGTERM, stop))


def _restore_sigterm() -> None:
    if _sigterm_handlers:
        signal.signal(signal.SIGTERM, _sigterm_handlers.pop())


#: prctl(2) option: the signal a Linux process receives when its parent ends
PR_SET_PDEATHSIG = 1


def _end_with_parent(parent: int) -> None:
    """Make this worker receive SIGTERM when its pipeline process (`parent`) ends, even by SIGKILL: Linux's
    parent-death signal (prctl PR_SET_PDEATHSIG), elsewhere a thread that watches the parent pid each second. A
    worker whose parent already ended stops here. SIGTERM makes a training worker save its last.ckpt and stop."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if not sys.platform.startswith("linux") or libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) is not available")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="watch-pipeline", daemon=True).start()
    if os.getppid() != parent:
        raise SystemExit(f"[pipeline] process {parent} ended before its stage worker {os.getpid()} started")


class _FollowThreadShare(L.Callback):
    """In a worker of `train_in_workers`: before each batch, use the number of torch threads the parent assigned."""

    def __init__(self, stage: str, share: Any):
        self.stage, self.share = stage, share

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"[pipeline] stage '{self.stage}': {torch.get_num_threads()} threads in process {os.getpid()}",
              flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        threads = self.share.value
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            tqdm.write(f"[pipeline] stage '{self.stage}': {threads} threads from step {trainer.global_step}")


def _stage_worker(plan: Plan, name: str, command: Optional[list[str]], share: Any, results, parent: int) -> None:
    """One stage in a worker process of pipeline process `parent`: its inputs are read from their model.ckpt; `share`
    holds its thread count; puts (name, None or the error). Ends with its parent (`_end_with_parent`)."""
    _end_with_parent(parent)
    torch.set_num_threads(share.value)
    try:
        sources = set(plan.parsed[name].inputs.values())
        trained = {source: load_module(str(plan.run_dir / source / "model.ckpt"), expected=plan.classes[source])
                   for source in sources}
        train_stage(plan, name, trained, command, callbacks=(_FollowThreadShare(name, share),))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        if os.getppid() != parent:  # the pipeline ended (its SIGTERM stopped this worker): nobody to report to
            saved = getattr(err, "last_checkpoint", None)
            print(f"[pipeline] stage '{name}': stopped with its pipeline (process {parent})"
                  + (f"; state saved to {saved}" if saved else ""), file=sys.stderr, flush=True)
            return
        if not isinstance(err, SystemExit):
            traceback.print_exc()
        try:
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 - an error that cannot cross processes is described instead
            err = RuntimeError(f"stage '{name}': {type(err).__name__}: {err}")
        results.put((name, err))
    else:
        results.put((name, None))
