"""Activation caching: exactness against HF hidden_states, shard formats, resume after SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _fixtures_models import make_tiny_model, write_tokens
from conftest import done_shards

from saeflow.activations import (
    PROGRESS,
    TEST_DELAY_ENV,
    _read_shard,
    _write_shard,
    cache_activations,
    iter_activation_shards,
    load_activations,
    plan_shards,
)
from saeflow.errors import ConfigError, DataError
from saeflow.io import read_manifest
from saeflow.models import load_lm

SRC = str(Path(__file__).resolve().parents[1] / "src")
N_SEQS = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: make_tiny_model(k, root / k, n_layers=3) for k in ("gpt2", "llama", "gemma2")}


def _random_seqs(n: int, seed: int = 0, max_len: int = 14) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 64, size=rng.integers(1, max_len)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    seqs = _random_seqs(N_SEQS)
    seqs[5] = []  # an empty sequence contributes no rows
    return write_tokens(tmp_path_factory.mktemp("tok") / "tokens.parquet", seqs)


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")
    }


def test_plan_shards():
    lens = np.array([3, 4, 0, 2, 9, 0, 1, 1])
    assert plan_shards(lens, 7) == [(0, 3), (3, 4), (4, 6), (6, 8)]
    assert plan_shards(lens, 100) == [(0, 8)]
    assert plan_shards(np.array([5]), 1) == [(0, 1)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_equals_hidden_states(tmp_path, models, tokens, kind, side):
    """Acceptance: cached rows == hidden_states[L+1] of an untruncated per-sequence forward."""
    layer = 1
    out = tmp_path / "layer_1"
    manifest = cache_activations(
        {"path": str(models[kind]), "name": kind}, tokens, out, layer=layer, batch_size=5,
        fmt="parquet", shard_tokens=40, device="cpu", padding_side=side,
    )  # fmt: skip
    assert (out / "manifest.json").exists()
    assert manifest["dtype"] == "float32" and manifest["d_model"] == 32
    seq_ids, positions, acts_ND = load_activations(out / "manifest.json")
    full = load_lm(models[kind], device="cpu", with_head=True)
    seqs = _random_seqs(N_SEQS)
    seqs[5] = []
    expected_seq, expected_pos, expected = [], [], []
    for sid, s in enumerate(seqs):
        if not s:
            continue
        with torch.no_grad():
            hs = full(torch.tensor([s]), output_hidden_states=True).hidden_states[layer + 1][0]
        expected.append(hs)
        expected_seq += [sid] * len(s)
        expected_pos += list(range(len(s)))
    assert manifest["n_tokens"] == len(expected_seq) == acts_ND.shape[0]
    np.testing.assert_array_equal(seq_ids, expected_seq)
    np.testing.assert_array_equal(positions, expected_pos)
    torch.testing.assert_close(acts_ND, torch.cat(expected), atol=1e-5, rtol=0)


def test_formats_agree_and_stream(tmp_path, models, tokens):
    common = {"layer": 2, "batch_size": 4, "shard_tokens": 30, "device": "cpu"}
    spec = {"path": str(models["gpt2"])}
    m_pq = cache_activations(spec, tokens, tmp_path / "pq", fmt="parquet", **common)
    m_pt = cache_activations(spec, tokens, tmp_path / "pt", fmt="pt", **common)
    for key in (
        "format",
        "dtype",
        "d_model",
        "n_tokens",
        "layer",
        "model",
        "shards",
        "config_hash",
    ):
        assert key in m_pq
    assert m_pq["config_hash"] != m_pt["config_hash"]
    assert [s["n_tokens"] for s in m_pq["shards"]] == [s["n_tokens"] for s in m_pt["shards"]]
    assert all(s["n_tokens"] <= 30 for s in m_pq["shards"])
    assert read_manifest(tmp_path / "pq") == m_pq
    a = load_activations(tmp_path / "pq")
    b = load_activations(tmp_path / "pt" / "manifest.json")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert torch.equal(a[2], b[2])
    parts = list(iter_activation_shards(tmp_path / "pq"))
    assert len(parts) == len(m_pq["shards"]) > 1
    assert [len(p[0]) for p in parts] == [s["n_tokens"] for s in m_pq["shards"]]
    assert torch.equal(torch.cat([p[2] for p in parts]), a[2])


@pytest.mark.parametrize("fmt", ["parquet", "pt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shard_roundtrip_bitwise(tmp_path, fmt, dtype):
    """bf16 rows go to disk as raw 2-byte rows and come back bit for bit."""
    acts_ND = torch.randn(37, 24).to(dtype)
    seq_N = np.repeat(np.arange(5, dtype=np.int32), [7, 7, 7, 8, 8])
    pos_N = np.arange(37, dtype=np.int32) % 7
    path = tmp_path / f"part-00000.{fmt}"
    _write_shard(path, fmt, seq_N, pos_N, acts_ND)
    seq, pos, back = _read_shard(path, fmt, dtype, 24)
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), acts_ND.view(torch.uint8))
    np.testing.assert_array_equal(seq, seq_N)
    np.testing.assert_array_equal(pos, pos_N)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        field = pq.read_schema(path).field("act")
        assert str(field.type) == f"fixed_size_binary[{24 * acts_ND.element_size()}]"


def test_rerun_skips_everything(tmp_path, models, tokens, monkeypatch, caplog):
    kw = {"layer": 0, "batch_size": 8, "fmt": "parquet", "shard_tokens": 50, "device": "cpu"}
    spec = {"path": str(models["llama"])}
    first = cache_activations(spec, tokens, tmp_path, **kw)
    before = _files(tmp_path)

    def no_load(*args, **kwargs):
        raise AssertionError("a complete cache must not load the model")

    monkeypatch.setattr("saeflow.activations.load_lm", no_load)
    with caplog.at_level(logging.INFO, logger="saeflow"):
        again = cache_activations(spec, tokens, tmp_path, **kw)
    n = len(first["shards"])
    assert f"skipped {n} of {n} shards" in caplog.text
    assert again == first and _files(tmp_path) == before


def test_other_config_hash_is_discarded(tmp_path, models, tokens, caplog):
    spec = {"path": str(models["gpt2"])}
    kw = {"batch_size": 4, "fmt": "parquet", "shard_tokens": 25, "device": "cpu"}
    cache_activations(spec, tokens, tmp_path / "mixed", layer=0, **kw)
    (tmp_path / "mixed" / "part-00099.parquet").write_bytes(b"junk")
    with caplog.at_level(logging.INFO, logger="saeflow"):
        m = cache_activations(spec, tokens, tmp_path / "mixed", layer=1, **kw)
    assert f"skipped 0 of {len(m['shards'])} shards" in caplog.text
    fresh = cache_activations(spec, tokens, tmp_path / "fresh", layer=1, **kw)
    assert m == fresh
    assert _files(tmp_path / "mixed") == _files(tmp_path / "fresh")
    # Same hash but a shard whose size no longer matches its record is recomputed.
    victim = tmp_path / "mixed" / "part-00001.parquet"
    victim.write_bytes(b"truncated")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeflow"):
        cache_activations(spec, tokens, tmp_path / "mixed", layer=1, **kw)
    n = len(m["shards"])
    assert f"skipped {n - 1} of {n} shards" in caplog.text
    assert _files(tmp_path / "mixed") == _files(tmp_path / "fresh")


def test_changed_weights_in_same_folder_invalidate_shards(tmp_path, models, tokens, caplog):
    """The resume key hashes the weight bytes: a retrained model in place reuses no shard."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(models["gpt2"], folder)
    spec = {"path": str(folder)}
    kw = {"layer": 0, "batch_size": 4, "fmt": "parquet", "shard_tokens": 25, "device": "cpu"}
    first = cache_activations(spec, tokens, tmp_path / "out", **kw)
    n = len(first["shards"])
    weights = next(folder.glob("*.safetensors"))
    state = load_file(weights)
    save_file(state, weights, metadata={"format": "pt"})  # same tensors rewritten: same key
    with caplog.at_level(logging.INFO, logger="saeflow"):
        again = cache_activations(spec, tokens, tmp_path / "out", **kw)
    assert again["config_hash"] == first["config_hash"], "rewriting equal bytes changed the key"
    assert f"skipped {n} of {n} shards" in caplog.text
    name = next(k for k in state if k.endswith("h.0.mlp.c_fc.bias"))
    state[name] = state[name] + 1.0  # one bias of block 0: a small in-place retrain
    save_file(state, weights, metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeflow"):
        changed = cache_activations(spec, tokens, tmp_path / "out", **kw)
    assert changed["config_hash"] != first["config_hash"]
    assert f"skipped 0 of {n} shards" in caplog.text


def test_failed_row_group_write_commits_nothing(tmp_path, models, tokens, monkeypatch):
    """A shard whose row-group write fails is neither renamed into place nor recorded."""
    from saeflow import activations

    real_append = activations._ParquetShard.append

    def flaky_append(self, *args):
        if self.path.name == "part-00001.parquet":
            raise OSError("disk full")
        real_append(self, *args)

    monkeypatch.setattr(activations._ParquetShard, "append", flaky_append)
    out = tmp_path / "out"
    kw = {"layer": 0, "batch_size": 4, "fmt": "parquet", "shard_tokens": 40, "device": "cpu"}
    with pytest.raises(OSError, match="disk full"):
        cache_activations({"path": str(models["gpt2"])}, tokens, out, **kw)
    done = json.loads((out / PROGRESS).read_text())["shards"]
    assert sorted(done) == ["part-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == [PROGRESS, "part-00000.parquet"]
    monkeypatch.setattr(activations._ParquetShard, "append", real_append)
    resumed = cache_activations({"path": str(models["gpt2"])}, tokens, out, **kw)
    fresh = cache_activations({"path": str(models["gpt2"])}, tokens, tmp_path / "fresh", **kw)
    assert resumed == fresh and _files(out) == _files(tmp_path / "fresh")


def test_streamed_row_groups_are_coalesced(tmp_path, models, tokens, monkeypatch):
    """Batches of one short sequence do not become one tiny Parquet row group each."""
    import pyarrow.parquet as pq

    from saeflow import activations

    spec = {"path": str(models["gpt2"])}
    kw = {"layer": 0, "batch_size": 1, "fmt": "parquet", "shard_tokens": 10_000, "device": "cpu"}
    m = cache_activations(spec, tokens, tmp_path / "one", **kw)
    assert pq.ParquetFile(tmp_path / "one" / m["shards"][0]["file"]).num_row_groups == 1
    monkeypatch.setattr(activations, "ROW_GROUP_ROWS", 30)
    m = cache_activations(spec, tokens, tmp_path / "many", **kw)
    groups = pq.ParquetFile(tmp_path / "many" / m["shards"][0]["file"]).metadata
    sizes = [groups.row_group(g).num_rows for g in range(groups.num_row_groups)]
    assert len(sizes) > 1 and all(n >= 30 for n in sizes[:-1]), sizes
    a, b = load_activations(tmp_path / "one"), load_activations(tmp_path / "many")
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2], strict=True))
    assert torch.equal(a[2], b[2])


_CHILD = """
import sys
from saeflow.activations import cache_activations
cache_activations({"path": sys.argv[1]}, sys.argv[2], sys.argv[3], layer=1, batch_size=3,
                  fmt="parquet", shard_tokens=12, device="cpu")
"""


def test_sigkill_then_resume_is_byte_identical(tmp_path, models, tokens, caplog):
    """A run killed between shards resumes from its finished shards, to the same bytes."""
    model = str(models["gpt2"])
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": SRC, TEST_DELAY_ENV: "1.0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, model, str(tokens), str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300  # guards against a hang only; nothing is timed
    try:
        while done_shards(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not (killed / "manifest.json").exists()
    n_done = done_shards(killed)
    kw = {"layer": 1, "batch_size": 3, "fmt": "parquet", "shard_tokens": 12, "device": "cpu"}
    with caplog.at_level(logging.INFO, logger="saeflow"):
        m = cache_activations({"path": model}, tokens, killed, **kw)
    n = len(m["shards"])
    assert 2 <= n_done < n
    assert f"skipped {n_done} of {n} shards" in caplog.text
    clean = tmp_path / "clean"
    cache_activations({"path": model}, tokens, clean, **kw)
    assert _files(killed) == _files(clean)


def test_bad_inputs(tmp_path, models, tokens):
    spec = {"path": str(models["gpt2"])}
    with pytest.raises(ConfigError, match="activations.format"):
        cache_activations(spec, tokens, tmp_path, layer=0, batch_size=2, fmt="npy")
    with pytest.raises(ConfigError, match="layer"):
        cache_activations(spec, tokens, tmp_path, layer=7, batch_size=2, device="cpu")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        cache_activations(spec, bad, tmp_path, layer=0, batch_size=2, device="cpu")
    with pytest.raises(DataError, match="manifest"):
        load_activations(tmp_path / "nowhere")


def test_script(tmp_path, models, tokens):
    """The Snakemake entry points pass params through and write the declared manifests."""
    manifest = tmp_path / "act" / "manifest.json"
    snakemake = SimpleNamespace(
        input=SimpleNamespace(tokens=str(tokens)),
        output=SimpleNamespace(manifest=str(manifest)),
        params=SimpleNamespace(
            model={"name": "m", "path": str(models["llama"]), "revision": None,
                   "trust_remote_code": False, "layer": 1, "batch_size": 4},
            hookpoints=[{"layer": 1, "hook": "resid_post"}, {"layer": 0, "hook": "mlp_out"}],
            activations={"format": "pt", "shard_tokens": 64},
            runtime={"device": "cpu", "dtype": "bfloat16", "seed": 0},
        ),
        wildcards=SimpleNamespace(),
        log=[str(tmp_path / "log.txt")],
        threads=1,
    )  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "scripts" / "cache_activations.py"
    stdout, stderr = sys.stdout, sys.stderr
    try:
        runpy.run_path(str(script), init_globals={"snakemake": snakemake})
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        logging.basicConfig(force=True)
    assert [(e["layer"], e["hook"]) for e in read_manifest(manifest)["hookpoints"]] == [
        (0, "mlp_out"),
        (1, "resid_post"),
    ]
    (tmp_path / "act" / "layer_1" / "resid_post" / "manifest.json").unlink()
    publish = SimpleNamespace(
        input=SimpleNamespace(set=str(manifest)),
        output=SimpleNamespace(manifest=str(tmp_path / "act/layer_1/resid_post/manifest.json")),
        wildcards=SimpleNamespace(layer="1", hook="resid_post"),
        log=[str(tmp_path / "publish.txt")],
    )
    script = script.parent / "publish_hookpoint.py"
    try:
        runpy.run_path(str(script), init_globals={"snakemake": publish})
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        logging.basicConfig(force=True)
    m = read_manifest(tmp_path / "act" / "layer_1" / "resid_post")
    assert m["format"] == "pt" and m["layer"] == 1 and m["model"] == "m"
    assert m["hook"] == "resid_post" and m["hook_name"] == "blocks.1.hook_resid_post"
    assert "skipped 0 of" in (tmp_path / "log.txt").read_text()
