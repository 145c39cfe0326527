"""GPU placement with a faked device list: distinct devices, release on SIGKILL, CPU no-op."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saeflow import devices
from saeflow.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"

# A job that takes a slot, reports it, and holds it until told to stop (or is killed).
HOLDER = """
import sys, time, pathlib
from saeflow.devices import gpu_slot
out, release = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with gpu_slot(timeout_s=120, poll_s=0.05) as dev:
    import os
    out.with_suffix(".tmp").write_text(f"{dev} {os.environ['CUDA_VISIBLE_DEVICES']}")
    out.with_suffix(".tmp").rename(out)
    while not release.exists():
        time.sleep(0.05)
"""


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """Two fake GPUs and a private lock dir; no SLURM job in the environment."""
    monkeypatch.setenv(devices.GPUS_ENV, "0,1")
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    return tmp_path


def _start_holder(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = tmp_path / f"{name}.dev"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(tmp_path / "release")], env=env
    )
    return proc, out


def _wait_for(path: Path, proc: subprocess.Popen) -> str:
    """The holder's report; fails (not times out) if the holder dies first."""
    while not path.exists():
        assert proc.poll() is None, f"holder exited with {proc.returncode} before taking a slot"
        time.sleep(0.05)
    return path.read_text()


def test_device_source_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setenv(devices.GPUS_ENV, "2, 3,")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert devices.device_source() == (devices.GPUS_ENV, ["2", "3"])
    monkeypatch.delenv(devices.GPUS_ENV)
    assert devices.device_source() == ("CUDA_VISIBLE_DEVICES", ["5"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert devices.available_devices() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert devices.device_source() == ("none", [])


def test_nvidia_smi_count(monkeypatch, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: H100 (UUID: GPU-a)'\necho 'GPU 1: H100 (UUID: GPU-b)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(devices.GPUS_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.device_source() == ("nvidia-smi", ["0", "1"])


def test_slot_pins_and_restores(fake_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with devices.gpu_slot() as dev:
        assert dev == "0"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        with devices.gpu_slot() as inner:  # re-entrant: same device, no self-deadlock
            assert inner == "0"
        assert "slot=0" in devices.describe()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert "CUDA_DEVICE_ORDER" not in os.environ
    assert "devices=0,1 (from SAEFLOW_GPUS)" in devices.describe()


def test_cpu_is_a_noop(fake_gpus, monkeypatch):
    monkeypatch.setenv(devices.GPUS_ENV, "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with devices.gpu_slot("cuda") as dev:
        assert dev is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv(devices.GPUS_ENV, "0")
    with devices.gpu_slot("cpu") as dev:
        assert dev is None
    assert not (fake_gpus / "locks").exists()


def test_all_taken_times_out(fake_gpus):
    lock_dir = devices.lock_dir()
    lock_dir.mkdir(parents=True)
    fds = [devices._try_lock(lock_dir, d) for d in ("0", "1")]
    try:
        with (
            pytest.raises(RuntimeError, match="no free GPU among"),
            devices.gpu_slot(timeout_s=0, poll_s=0.01),
        ):
            pass
    finally:
        for fd in fds:
            os.close(fd)
    with devices.gpu_slot(timeout_s=0) as dev:
        assert dev == "0"


def test_slurm_job_scopes_locks(fake_gpus, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert devices.lock_dir() == fake_gpus / "locks" / "slurm-42"


def test_concurrent_jobs_get_distinct_devices_and_kill_releases(fake_gpus):
    procs = []
    try:
        a, a_out = _start_holder(fake_gpus, "a")
        b, b_out = _start_holder(fake_gpus, "b")
        procs += [a, b]
        got_a, got_b = _wait_for(a_out, a), _wait_for(b_out, b)
        dev_a, cvd_a = got_a.split()
        dev_b, cvd_b = got_b.split()
        assert {dev_a, dev_b} == {"0", "1"}
        assert (cvd_a, cvd_b) == (dev_a, dev_b)

        a.send_signal(signal.SIGKILL)
        a.wait()
        c, c_out = _start_holder(fake_gpus, "c")
        procs.append(c)
        assert _wait_for(c_out, c).split()[0] == dev_a
    finally:
        (fake_gpus / "release").touch()
        for proc in procs:
            proc.wait(timeout=60)
    assert b.returncode == 0 and c.returncode == 0


def test_resolve_device_and_dtype():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    assert devices.resolve_device({"device": "auto"}) == torch.device("cpu")
    assert devices.resolve_device({"device": "cuda"}) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"runtime\.device"):
        devices.resolve_device({"device": "tpu"})
    cpu = torch.device("cpu")
    assert devices.resolve_dtype({"dtype": "bfloat16"}, cpu) == torch.float32
    assert devices.resolve_dtype({"dtype": "float16"}, torch.device("cuda")) == torch.float16
    with pytest.raises(ConfigError, match=r"runtime\.dtype"):
        devices.resolve_dtype({"dtype": "int8"}, cpu)
