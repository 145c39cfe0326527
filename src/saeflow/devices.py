"""GPU placement: one free device per concurrent job, and the runtime device/dtype.

Snakemake counts GPUs (`--resources gpu=N`) but never says WHICH GPU a job gets, so two GPU jobs
started side by side would both land on `cuda:0`. `gpu_slot()` gives each concurrent job its own
device: it takes an exclusive `flock` on a per-device lock file and pins `CUDA_VISIBLE_DEVICES`
to that device before torch initialises CUDA. The kernel drops a `flock` when its holder exits,
so a job that crashes or is SIGKILLed frees its device with no cleanup step.

Devices come from, in order: `SAEFLOW_GPUS` (comma list), the incoming `CUDA_VISIBLE_DEVICES`
(SLURM sets it to the job's allocation), `nvidia-smi -L`, else none (CPU: the slot is a no-op).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saeflow.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("saeflow.devices")

GPUS_ENV = "SAEFLOW_GPUS"
LOCK_DIR_ENV = "SAEFLOW_GPU_LOCK_DIR"
WAIT_ENV = "SAEFLOW_GPU_WAIT_S"
DEFAULT_WAIT_S = 3600.0
WAIT_LOG_EVERY_S = 60.0
_VALID_DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

_warned_no_gpu = False
_held: dict[str, Any] = {"device": None, "depth": 0}


def _split_ids(value: str) -> list[str]:
    """`"0, 2,"` -> `["0", "2"]`; `""` and CUDA's "hide everything" values -> []."""
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if ids in (["-1"], ["NoDevFiles"]):
        return []
    return ids


def _nvidia_smi_ids() -> list[str]:
    """GPU indices listed by `nvidia-smi -L` ([] when the tool is missing or fails)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def device_source() -> tuple[str, list[str]]:
    """Where the device list comes from and the ids it names (see module docstring)."""
    if GPUS_ENV in os.environ:
        return GPUS_ENV, _split_ids(os.environ[GPUS_ENV])
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return "CUDA_VISIBLE_DEVICES", _split_ids(os.environ["CUDA_VISIBLE_DEVICES"])
    ids = _nvidia_smi_ids()
    return ("nvidia-smi", ids) if ids else ("none", [])


def available_devices() -> list[str]:
    """Device ids a job may be placed on (CUDA_VISIBLE_DEVICES values: indices or UUIDs)."""
    return device_source()[1]


def lock_dir() -> Path:
    """Directory of the per-device lock files, scoped to the SLURM job when there is one.

    Inside a SLURM allocation the ids are allocation-relative (with device cgroups every job
    sees `0`), so locks are shared only between the steps of one SLURM job.
    """
    base = Path(os.environ.get(LOCK_DIR_ENV) or f"/tmp/saeflow-gpu-locks-{os.getuid()}")
    slurm_job = os.environ.get("SLURM_JOB_ID")
    return base / f"slurm-{slurm_job}" if slurm_job else base


def _lock_name(device: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def _try_lock(directory: Path, device: str) -> int | None:
    """Open and flock the device's lock file without blocking; the fd on success."""
    fd = os.open(directory / _lock_name(device), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _wants_cuda(device: str) -> bool:
    if not _VALID_DEVICES.match(device):
        raise ConfigError(f"runtime.device: {device!r} is not auto, cpu, cuda or cuda:N")
    return device != "cpu"


def _cuda_already_initialised() -> bool:
    """True when torch has touched CUDA in this process (pinning would then be ignored)."""
    torch_mod = sys.modules.get("torch")
    if torch_mod is None:
        return False
    try:
        return bool(torch_mod.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a broken torch build must not stop a CPU run
        return False


@contextlib.contextmanager
def gpu_slot(
    device: str = "auto", *, timeout_s: float | None = None, poll_s: float = 1.0
) -> Iterator[str | None]:
    """Hold one free GPU for the duration of the block and pin `CUDA_VISIBLE_DEVICES` to it.

    Enter it before anything initialises CUDA (`torch.cuda.is_available()` included, e.g. via
    `seed_everything`). Yields the chosen device id (inside the block torch sees it as
    `cuda:0`), or None when running on CPU: `device="cpu"`, an explicit `cuda:N`, or no GPU.
    Waits up to `timeout_s` (default `$SAEFLOW_GPU_WAIT_S` or 3600 s) for a device to free up.
    Re-entrant within a process.
    """
    global _warned_no_gpu
    if not _wants_cuda(device) or device.startswith("cuda:"):
        if device.startswith("cuda:"):
            log.warning("runtime.device=%s pins a device itself; no GPU slot is taken", device)
        yield None
        return
    if _held["depth"]:
        _held["depth"] += 1
        try:
            yield _held["device"]
        finally:
            _held["depth"] -= 1
        return

    source, ids = device_source()
    if not ids:
        if not _warned_no_gpu:
            _warned_no_gpu = True
            level = logging.WARNING if device == "cuda" else logging.INFO
            log.log(
                level,
                "runtime.device=%s but no GPU is visible (%s); running on CPU",
                device,
                source,
            )
        yield None
        return
    if _cuda_already_initialised():
        log.warning("CUDA was initialised before gpu_slot(); CUDA_VISIBLE_DEVICES pin is ignored")

    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if timeout_s is None:
        timeout_s = float(os.environ.get(WAIT_ENV) or DEFAULT_WAIT_S)
    start = time.monotonic()
    next_log = start
    while True:
        for dev in ids:
            fd = _try_lock(directory, dev)
            if fd is not None:
                break
        else:
            now = time.monotonic()
            if now - start >= timeout_s:
                raise RuntimeError(
                    f"no free GPU among {ids} (from {source}) after {timeout_s:.0f} s; "
                    f"locks in {directory}"
                )
            if now >= next_log:
                log.info(
                    "all GPUs %s (from %s) are taken; waiting (locks in %s)", ids, source, directory
                )
                next_log = now + WAIT_LOG_EVERY_S
            time.sleep(poll_s)
            continue
        break

    previous = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    os.environ["CUDA_VISIBLE_DEVICES"] = dev
    # nvidia-smi numbers GPUs by PCI bus; CUDA's default order may differ.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    _held.update(device=dev, depth=1)
    log.info(
        "GPU slot: device %s of %s (from %s), waited %.1f s",
        dev,
        ids,
        source,
        time.monotonic() - start,
    )
    try:
        yield dev
    finally:
        _held.update(device=None, depth=0)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.close(fd)  # releases the flock


def describe() -> str:
    """One line for job logs: device source, ids, current pin, SLURM job, torch/CUDA state."""
    source, ids = device_source()
    parts = [
        f"devices={','.join(ids) or '-'} (from {source})",
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}",
        f"slot={_held['device'] if _held['depth'] else '-'}",
        f"lock_dir={lock_dir()}",
    ]
    if os.environ.get("SLURM_JOB_ID"):
        parts.append(f"slurm_job={os.environ['SLURM_JOB_ID']}")
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None:
        parts.append(f"torch={torch_mod.__version__} cuda_build={torch_mod.version.cuda}")
        if _cuda_already_initialised():
            parts.append(f"cuda_devices={torch_mod.cuda.device_count()}")
    return " ".join(parts)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}


def _runtime_value(spec: Any, key: str, default: str) -> Any:
    """`spec` is either the value itself or the `runtime` config mapping holding it under `key`."""
    if spec is None:
        return default
    if isinstance(spec, Mapping):
        return spec.get(key, default)
    return spec


def resolve_device(spec: str | torch.device | Mapping[str, Any] | None = None) -> torch.device:
    """`runtime.device` -> torch.device; `auto` = CUDA if visible, a missing GPU falls back to CPU.

    `spec` is a device name, a torch.device (returned as is) or the `runtime` config mapping.
    Call it inside `gpu_slot()` so that CUDA sees only the slot's device.
    """
    import torch

    value = _runtime_value(spec, "device", "auto")
    if isinstance(value, torch.device):
        return value
    device = str(value).strip().lower()
    if not _wants_cuda(device):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if device == "auto":
            log.info("runtime.device=auto found no CUDA device; running on CPU")
        else:
            log.warning("runtime.device=%s but CUDA is not available; running on CPU", device)
        return torch.device("cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"runtime.device: {device} but only {torch.cuda.device_count()} visible")
    return torch.device("cuda:0" if device == "auto" else device)


def resolve_dtype(
    spec: str | torch.dtype | Mapping[str, Any] | None, device: str | torch.device
) -> torch.dtype:
    """`runtime.dtype` on CUDA; CPU always computes in float32 (no fast bf16 on CPU).

    `spec` is a dtype name (`bfloat16`, `bf16`, `torch.float16`, ...), a torch.dtype or the
    `runtime` config mapping.
    """
    import torch

    value = _runtime_value(spec, "dtype", "bfloat16")
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        name = str(value).strip().lower().removeprefix("torch.")
        dtype = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"runtime.dtype: {value!r} is not a torch floating dtype")
    dev = device if isinstance(device, torch.device) else torch.device(str(device))
    return dtype if dev.type == "cuda" else torch.float32
