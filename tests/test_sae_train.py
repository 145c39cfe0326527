"""Organism SAE training: published layouts that load back and reconstruct held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from saeflow import io as sio
from saeflow.errors import ConfigError
from saeflow.sae import SAE, TemporalSAE, load_sae
from saeflow.sae.train import train_sae, train_temporal_sae

D, N_SEQ, L = 32, 60, 24


def write_sparse_acts(folder: Path, seed: int = 0) -> Path:
    """Sequences of x_t = topic(seq) + a few random atoms: sparse, with a predictable part."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(64, D, generator=g)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    rows = []
    for _ in range(N_SEQ):
        topic = atoms[torch.randint(16, (1,), generator=g)] * 3
        idx = torch.randint(16, 64, (L, 3), generator=g)
        coef = torch.rand(L, 3, generator=g) * 2 + 0.5
        rows.append(topic + (atoms[idx] * coef[..., None]).sum(1) + 0.5)
    acts = torch.cat(rows).contiguous()
    seq = np.repeat(np.arange(N_SEQ), L)
    pos = np.tile(np.arange(L), N_SEQ)
    raw = acts.numpy().view(np.uint8).reshape(len(seq), -1)
    col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(4 * D), len(seq), [None, pa.py_buffer(raw)]
    )
    folder.mkdir(parents=True)
    table = pa.table(
        {"seq_id": pa.array(seq, pa.int32()), "pos": pa.array(pos, pa.int32()), "act": col}
    )
    pq.write_table(table, folder / "part-00000.parquet")
    shard = {"file": "part-00000.parquet", "n_tokens": len(seq), "n_sequences": N_SEQ}
    manifest = {
        "format": "parquet",
        "dtype": "float32",
        "d_model": D,
        "n_tokens": len(seq),
        "n_sequences": N_SEQ,
        "layer": 2,
        "model": "organism-base",
        "shards": [shard],
        "config_hash": "synthetic",
    }
    sio.write_manifest(folder, manifest)
    return folder / "manifest.json"


def test_train_topk_sae_saelens_layout(tmp_path: Path) -> None:
    acts = write_sparse_acts(tmp_path / "acts")
    cfg = {
        "datasets": ["x"],
        "architecture": "topk",
        "width": 128,
        "k": 8,
        "steps": 200,
        "lr": 1e-2,
    }
    stats = train_sae([acts], tmp_path / "sae", cfg, seed=3)
    assert stats["heldout_variance_explained"] >= 0.8
    cfg_json = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "topk" and cfg_json["k"] == 8 and cfg_json["d_sae"] == 128
    assert cfg_json["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    sae = load_sae({"format": "saelens", "path": str(tmp_path / "sae")})
    assert isinstance(sae, SAE) and sae.k == 8 and sae.d_in == D
    train_sae([acts], tmp_path / "again", cfg, seed=3)
    for name in ("cfg.json", "sae_weights.safetensors", "training.json"):
        assert (tmp_path / "sae" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_train_temporal_sae_published_layout(tmp_path: Path) -> None:
    acts = write_sparse_acts(tmp_path / "acts", seed=1)
    cfg = {
        "datasets": ["x"],
        "exp_factor": 4,
        "n_heads": 2,
        "bottleneck_factor": 4,
        "kval_topk": 8,
        "steps": 300,
        "batch_sequences": 16,
    }
    stats = train_temporal_sae(acts, tmp_path / "t", cfg, seed=0)
    assert stats["heldout_variance_explained"] >= 0.8
    conf = yaml.safe_load((tmp_path / "t" / "conf.yaml").read_text())
    assert conf["llm"]["dimin"] == D and conf["sae"]["exp_factor"] == 4
    assert conf["sae"]["scaling_factor"] == pytest.approx(stats["scaling_factor"])
    assert (tmp_path / "t" / "latest_ckpt.safetensors").exists()
    sae = load_sae({"format": "temporal", "path": str(tmp_path / "t")})
    assert isinstance(sae, TemporalSAE) and sae.d_sae == 4 * D and sae.kval_topk == 8


def test_bad_train_config(tmp_path: Path) -> None:
    acts = write_sparse_acts(tmp_path / "acts")
    with pytest.raises(ConfigError, match="unknown key"):
        train_sae([acts], tmp_path / "s", {"widht": 3})
    with pytest.raises(ConfigError, match="train.k = 500"):
        train_sae([acts], tmp_path / "s", {"width": 64, "k": 500})
    assert not (tmp_path / "s").exists()


def _split_shards(manifest: Path, per_shard: int) -> Path:
    """Rewrite a one-shard cache as shards of `per_shard` sequences each (same rows)."""
    folder = manifest.parent
    table = pq.read_table(folder / "part-00000.parquet")
    meta = json.loads(manifest.read_text())
    seq = table.column("seq_id").to_numpy()
    shards = []
    for i, first in enumerate(range(0, int(seq.max()) + 1, per_shard)):
        part = table.filter(
            pa.compute.and_(
                pa.compute.greater_equal(table["seq_id"], first),
                pa.compute.less(table["seq_id"], first + per_shard),
            )
        )
        name = f"part-{i:05d}.parquet"
        pq.write_table(part, folder / name)
        n_seq = len(set(part.column("seq_id").to_pylist()))
        shards.append({"file": name, "n_tokens": part.num_rows, "n_sequences": n_seq})
    meta["shards"] = shards
    sio.write_manifest(folder, meta)
    return manifest


@pytest.mark.parametrize("n_copies", [1, 3])
def test_training_streams_with_bounded_memory(tmp_path: Path, n_copies: int) -> None:
    """With a 120-token buffer and 5-sequence shards, what training holds at once stays under
    buffer + one shard however many tokens there are, and the SAE still learns."""
    acts = [
        _split_shards(write_sparse_acts(tmp_path / f"acts{i}", seed=i), per_shard=5)
        for i in range(n_copies)
    ]
    shard = 5 * L
    cfg = {"datasets": ["x"], "width": 128, "k": 8, "steps": 200, "lr": 1e-2, "buffer_tokens": 120}
    stats = train_sae(acts, tmp_path / "sae", cfg, seed=0)
    assert stats["n_train_tokens"] == n_copies * (N_SEQ - N_SEQ // 10) * (L - 1)
    assert 0 < stats["peak_buffer_tokens"] <= 120 + shard
    assert stats["heldout_variance_explained"] >= 0.6
    t_cfg = {
        "datasets": ["x"],
        "n_heads": 2,
        "kval_topk": 8,
        "steps": 20,
        "batch_sequences": 4,
        "buffer_tokens": 120,
    }
    t_stats = train_temporal_sae(acts, tmp_path / "t", t_cfg, seed=0)
    assert 0 < t_stats["peak_buffer_tokens"] <= 120 + shard


def test_stream_holds_out_every_tenth_sequence(tmp_path: Path) -> None:
    from saeflow.sae.train import SequenceStream

    acts = _split_shards(write_sparse_acts(tmp_path / "acts"), per_shard=7)
    stream = SequenceStream([acts], 10, 10_000)
    held = list(stream.sequences(held=True))
    train = list(stream.sequences(held=False))
    assert len(held) == N_SEQ // 10 and len(train) == N_SEQ - N_SEQ // 10
    first = next(stream.windows())
    assert sum(len(s) for s in first) == len(train) * L
    with pytest.raises(ConfigError, match="buffer_tokens = 5"):
        next(SequenceStream([acts], 10, 5).windows())
