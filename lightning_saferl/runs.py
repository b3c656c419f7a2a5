"""Run directories, shared by `fit` and every `pipeline` stage: one layout, one way to build the Trainer.

A run logs into `<root>/lightning_logs/version_N/` (root: `--trainer.default_root_dir` for `fit`,
`<run_dir>/<stage>` for a pipeline stage; a new N per start or resume):

    metrics.csv, events.out.tfevents.*   CSV and TensorBoard logs
    config.yaml, run_info.json           the resolved config; seed, package versions and command line
    checkpoints/last.ckpt                full state, every N steps, at the end and on SIGTERM

Config records: a pipeline stage writes into each of its checkpoints (`CONFIG_KEY`) its resolved config without
`RESULT_NEUTRAL_KEYS` and the config's sha256, so a rerun can tell whether a checkpoint belongs to the config
it is given (`config_changes`).

Files that other programs read (configs, records, summaries) are written atomically (`atomic_write_text`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_saferl.errors import InputError

__all__ = ["atomic_write_text", "write_run_record", "RunRecord", "write_run_info", "package_versions", "trainer_arguments",
           "native_bf16_cpu", "bf16_if_native_cpu", "RESOLVERS", "register_resolvers", "latest_checkpoint",
           "config_record", "config_changes", "stored_record", "CONFIG_KEY", "RESULT_NEUTRAL_KEYS",
           "check_training_length"]

#: checkpoint entry holding {"sha256": ..., "config": ...} of the config the checkpoint was trained with
CONFIG_KEY = "lightning_saferl_config"
#: config keys that only decide what is shown or where logs go: they never change weights or metrics, so a rerun
#: may change them. Everything else counts (callbacks too: a callback may draw random numbers or stop training).
RESULT_NEUTRAL_KEYS = ("trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.logger",
                       "trainer.log_every_n_steps", "trainer.default_root_dir")


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write `text` to a temporary file of this process next to `path`, then rename it over `path`: a reader
    sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` reports: figures name the machine they came from."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, Optional[str]]:
    """Versions of Python and the packages a run depends on; torch's as `torch.__version__`, whose local tag (+cpu,
    +cu130) names the build: the installed distribution's metadata omits it for some builds."""
    import importlib.metadata as md
    import platform

    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for pkg in ("lightning-saferl", "lightning", "gymnasium", "numpy", "h5py", "jsonargparse"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["torch"] = torch.__version__
    return versions


def write_run_info(directory, seed: Any, command: Optional[list[str]] = None) -> None:
    """`<directory>/run_info.json`: the seed, package versions and the command line, for repeating the run."""
    info = {"seed": seed, "versions": package_versions(), "command": command if command is not None else sys.argv,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(Path(directory) / "run_info.json", json.dumps(info, indent=2))


def write_run_record(directory, config_yaml: str, seed: Any, command: Optional[list[str]] = None) -> None:
    """`config.yaml` and `run_info.json` of a run directory."""
    atomic_write_text(Path(directory) / "config.yaml", config_yaml)
    write_run_info(directory, seed, command)


class RunRecord(Callback):
    """Writes `config.yaml` (`config_yaml`) and `run_info.json` into the run directory when training is set up
    (rank zero; after the loggers created the directory)."""

    def __init__(self, directory: Union[str, os.PathLike], config_yaml: str, seed: Any,
                 command: Optional[list[str]] = None):
        self.directory, self.config_yaml, self.seed, self.command = directory, config_yaml, seed, command

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            write_run_record(self.directory, self.config_yaml, self.seed, self.command)


def _next_version(root: Path) -> str:
    versions = [int(d.name[len("version_"):]) for d in (root.iterdir() if root.is_dir() else [])
                if d.name.startswith("version_") and d.name[len("version_"):].isdigit()]
    return f"version_{max(versions, default=-1) + 1}"


def latest_checkpoint(root: Union[str, os.PathLike]) -> Optional[Path]:
    """`checkpoints/last.ckpt` of the newest run under `<root>/lightning_logs` that has one (None if none)."""
    found = [(int(p.parent.parent.name[len("version_"):]), p)
             for p in Path(root, "lightning_logs").glob("version_*/checkpoints/last.ckpt")
             if p.parent.parent.name[len("version_"):].isdigit()]
    return max(found)[1] if found else None


class _RecordingCheckpointIO(TorchCheckpointIO):
    """Torch checkpoint files with the run's config record added (`CONFIG_KEY`)."""

    def __init__(self, record: dict):
        super().__init__()
        self.record = record

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        super().save_checkpoint({**checkpoint, CONFIG_KEY: self.record}, path, storage_options)


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, torch's own probes). Elsewhere oneDNN
    emulates bf16 matrix products."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def bf16_if_native_cpu() -> str:
    """The precision a stage that gains from bf16 on CPU trains with: "bf16-mixed" where the run trains on a CPU
    (no CUDA device for `accelerator: auto` to pick) that multiplies bf16 natively, else "32-true" (emulated
    bf16, and on a GPU these small networks are bound by kernel launches, not arithmetic). Recipes write it as
    `precision: ${bf16_if_native_cpu:}`; a run's config records the value it resolved to."""
    return "bf16-mixed" if not torch.cuda.is_available() and native_bf16_cpu() else "32-true"


#: OmegaConf resolvers that configs may use (pipeline recipes and `fit` configs): `precision: ${bf16_if_native_cpu:}`
RESOLVERS = {"bf16_if_native_cpu": bf16_if_native_cpu}


def register_resolvers() -> None:
    """Make `RESOLVERS` known to OmegaConf; the config parsers call this before they read a file."""
    from omegaconf import OmegaConf

    with warnings.catch_warnings():  # omegaconf 2.4 renames register_new_resolver; 2.3 has only this one
        warnings.simplefilter("ignore")
        for name, resolver in RESOLVERS.items():
            OmegaConf.register_new_resolver(name, resolver, replace=True)


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_upstream() -> None:
    """Silence lines Lightning prints for every run that a lightning-saferl user cannot act on: torch (2.13)
    deprecates the LeafSpec class that Lightning 2.6 still builds; the actors hold their frozen critics in eval mode
    on purpose; Lightning advertises its cloud logger."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_an_advert)


def trainer_arguments(config: dict, last_checkpoint: Any = None,
                      record: Optional[dict] = None) -> tuple[dict, Path]:
    """(Trainer arguments, run directory): `config` (Trainer arguments, instantiated objects) completed the way
    every lightning-saferl run is. The run directory is the next `<default_root_dir>/lightning_logs/version_N`;
    with `logger` unset or True, CSV + TensorBoard loggers write there; `last_checkpoint` (a LastCheckpoint, its
    `dirpath` defaulting to `<run directory>/checkpoints`) joins the callbacks unless checkpointing is disabled;
    a `TimedProgressBar` joins them unless the bar is disabled or they hold one; `record` is written into every
    checkpoint. Installs `quiet_upstream`."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    quiet_upstream()
    config = dict(config)
    root = Path(config.get("default_root_dir") or os.getcwd())
    version = _next_version(root / "lightning_logs")
    run_dir = root / "lightning_logs" / version
    callbacks = config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if last_checkpoint is not None and config.get("enable_checkpointing") is not False:
        if last_checkpoint.dirpath is None:
            last_checkpoint.dirpath = str(run_dir / "checkpoints")
        callbacks.append(last_checkpoint)
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        from lightning_saferl.callbacks.progress import TimedProgressBar

        callbacks.append(TimedProgressBar())
    config["callbacks"] = callbacks
    if config.get("logger") in (None, True):
        # CSV first: it is the log_dir owner, and it must find the directory empty (TensorBoard writes at once)
        config["logger"] = [CSVLogger(root, name="lightning_logs", version=version),
                            TensorBoardLogger(root, name="lightning_logs", version=version, default_hp_metric=False)]
    if record is not None:
        plugins = config.get("plugins") or []
        config["plugins"] = [*(plugins if isinstance(plugins, (list, tuple)) else [plugins]),
                             _RecordingCheckpointIO(record)]
    return config, run_dir


def check_training_length(trainer: dict, where: str = "") -> None:
    """InputError for Trainer arguments that train nothing (`max_steps` or `max_epochs` 0; `max_steps` < -1) or
    never stop (`max_steps` -1 and `max_epochs` -1 without `max_time`); `where` prefixes the message."""
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if steps == 0 or epochs == 0:
        raise InputError(f"{where}trainer.max_{'steps' if steps == 0 else 'epochs'} is 0: nothing would be trained; "
                         "give a positive number")
    if steps is not None and steps < -1:
        raise InputError(f"{where}trainer.max_steps must be > 0 (or -1: follow max_epochs), got {steps}")
    if steps in (-1, None) and epochs == -1 and trainer.get("max_time") is None:
        raise InputError(f"{where}trainer.max_steps -1 with max_epochs -1 trains forever; set max_steps, max_epochs "
                         "or max_time")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _without_neutral(config: dict) -> dict:
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in RESULT_NEUTRAL_KEYS)}


def config_record(config: dict) -> dict:
    """{"sha256", "config"} of a resolved config (plain YAML/JSON values), `RESULT_NEUTRAL_KEYS` left out."""
    kept = _without_neutral(config)
    return {"sha256": hashlib.sha256(_canonical(kept).encode()).hexdigest(), "config": kept}


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose value differs between two configs (or records), `RESULT_NEUTRAL_KEYS` ignored."""
    old = old["config"] if "sha256" in old else _without_neutral(old)
    new = new["config"] if "sha256" in new else _without_neutral(new)
    return sorted(k for k in old.keys() | new.keys() if _canonical(old.get(k)) != _canonical(new.get(k)))


def stored_record(checkpoint: dict) -> Optional[dict]:
    """The config record a checkpoint dict was saved with (None for checkpoints written without one)."""
    record = checkpoint.get(CONFIG_KEY)
    return record if isinstance(record, dict) and "sha256" in record else None
