"""encode_sae: sparse code shards that match the SAE, resume after a kill, and read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_sae_formats import write_saelens
from test_temporal_sae import DIMIN, _conf, _state, write_temporal

import saeflow
from saeflow import io as sio
from saeflow.codes import Codes, DenseCodes, load_codes, part_storage
from saeflow.errors import ConfigError, DataError
from saeflow.sae import encode as enc
from saeflow.sae import load_sae
from saeflow.sae.sparse import topk_encode


def write_acts(folder: Path, seq_lengths: list[list[int]], d: int, seed: int = 0) -> Path:
    """An activation directory in the cache_activations layout: one shard per list of lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards, seq_id, total = [], 0, 0
    for i, lengths in enumerate(seq_lengths):
        seq = np.concatenate([np.full(n, seq_id + j) for j, n in enumerate(lengths)])
        pos = np.concatenate([np.arange(n) for n in lengths])
        seq_id += len(lengths)
        acts = torch.randn(len(seq), d, generator=g) * 2 + torch.linspace(-1, 1, d)
        raw = acts.numpy().view(np.uint8).reshape(len(seq), -1)
        col = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(4 * d), len(seq), [None, pa.py_buffer(raw)]
        )
        name = f"part-{i:05d}.parquet"
        table = pa.table(
            {"seq_id": pa.array(seq, pa.int32()), "pos": pa.array(pos, pa.int32()), "act": col}
        )
        pq.write_table(table, folder / name)
        shards.append({"file": name, "n_tokens": len(seq), "n_sequences": len(lengths)})
        total += len(seq)
    manifest = {
        "format": "parquet",
        "dtype": "float32",
        "itemsize": 4,
        "d_model": d,
        "n_tokens": total,
        "n_sequences": seq_id,
        "layer": 2,  # the hook point write_saelens records (blocks.2.hook_resid_post)
        "hook": "resid_post",
        "model": "tiny",
        "shards": shards,
        "config_hash": f"acts{seed}",
    }
    sio.write_manifest(folder, manifest)
    return folder / "manifest.json"


def _all_acts(manifest: Path) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    from saeflow.activations import load_activations

    seq, pos, acts = load_activations(manifest)
    return np.asarray(seq), np.asarray(pos), acts.float()


LENGTHS = [[5, 7, 3], [6, 1, 8], [4]]


@pytest.mark.parametrize("k", [1, 5, 7, 60])
def test_topk_kernel_matches_torch_topk(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(300, 16, generator=g)
    W = torch.randn(16, 61, generator=g)
    b = torch.randn(61, generator=g) - 1.0
    pre = x @ W + b
    vals, idx = pre.topk(k, dim=-1)
    want = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    for kernel in (True, False):
        got = topk_encode(x, W, b, k, kernel=kernel)
        torch.testing.assert_close(got.to_dense(61), want, atol=1e-5, rtol=1e-5)
        ids = np.split(got.ids, got.indptr[1:-1])
        assert all(np.all(np.diff(r) > 0) for r in ids)


def test_encode_topk_sae(tmp_path: Path) -> None:
    acts = write_acts(tmp_path / "acts", LENGTHS, 16)
    write_saelens(tmp_path / "sae", "topk")
    spec = {"name": "sae", "format": "saelens", "path": str(tmp_path / "sae")}
    out = tmp_path / "codes" / "manifest.json"
    manifest = enc.encode_sae(acts, spec, out, runtime={"device": "cpu"}, encode_cfg={})
    assert manifest["parts"] == {"codes": "."} and manifest["n_tokens"] == 34
    assert manifest["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not (out.parent / enc.PROGRESS).exists()
    codes = saeflow.load_codes(out)
    seq, pos, x = _all_acts(acts)
    want = load_sae(spec).encode(x)
    np.testing.assert_array_equal(codes.seq_ids, seq)
    np.testing.assert_array_equal(codes.positions, pos)
    torch.testing.assert_close(
        codes.to_torch_sparse().to_dense(), want.half().float(), atol=0, rtol=0
    )
    assert (codes.l0() <= 5).all() and codes.nnz == manifest["nnz"]["codes"]
    np.testing.assert_array_equal(codes.to_scipy().toarray(), codes.to_dense())
    assert max(manifest["bytes_per_nonzero"].values()) < 40  # tiny files: parquet overhead
    with pytest.raises(DataError, match="part='pred' needs a temporal SAE"):
        load_codes(out, part="pred")


def test_resume_after_kill_gives_same_bytes(tmp_path: Path, monkeypatch) -> None:
    acts = write_acts(tmp_path / "acts", LENGTHS, 16)
    write_saelens(tmp_path / "sae", "jumprelu")
    spec = {"name": "sae", "format": "saelens", "path": str(tmp_path / "sae")}
    clean = tmp_path / "clean" / "manifest.json"
    enc.encode_sae(acts, spec, clean, runtime={"device": "cpu"})

    calls = []
    real = enc.write_code_shard

    def dying_writer(path, codes):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(path, codes)

    out = tmp_path / "killed" / "manifest.json"
    monkeypatch.setattr(enc, "write_code_shard", dying_writer)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_sae(acts, spec, out, runtime={"device": "cpu"})
    assert not out.exists() and (out.parent / "part-00000.parquet").exists()
    assert not list(out.parent.glob(".*tmp*"))
    calls.clear()
    monkeypatch.setattr(enc, "write_code_shard", real)
    counting = []
    monkeypatch.setattr(
        enc, "write_code_shard", lambda p, c: (counting.append(Path(p).name), real(p, c))
    )
    enc.encode_sae(acts, spec, out, runtime={"device": "cpu"})
    assert counting == ["part-00001.parquet", "part-00002.parquet"]
    for name in ("manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert (out.parent / name).read_bytes() == (clean.parent / name).read_bytes()


def test_changed_sae_discards_old_shards(tmp_path: Path, monkeypatch) -> None:
    acts = write_acts(tmp_path / "acts", LENGTHS, 16)
    write_saelens(tmp_path / "a", "topk")
    write_saelens(tmp_path / "b", "standard")
    out = tmp_path / "codes" / "manifest.json"
    enc.encode_sae(acts, {"format": "saelens", "path": str(tmp_path / "a")}, out)
    first = json.loads(out.read_text())["config_hash"]
    (out.parent / enc.PROGRESS).write_text(json.dumps({"config_hash": first, "shards": {}}))
    manifest = enc.encode_sae(acts, {"format": "saelens", "path": str(tmp_path / "b")}, out)
    assert manifest["config_hash"] != first
    assert manifest["mean_l0"]["codes"] > 5  # ReLU codes now, not the old TopK shards


def test_encode_temporal_sae(tmp_path: Path) -> None:
    acts = write_acts(tmp_path / "acts", LENGTHS, DIMIN, seed=2)
    conf = _conf()
    write_temporal(tmp_path / "temporal", conf, _state(conf))
    spec = {"name": "t", "format": "temporal", "path": str(tmp_path / "temporal")}
    out = tmp_path / "codes" / "manifest.json"
    manifest = enc.encode_sae(
        acts,
        spec,
        out,
        encode_cfg={"batch_tokens": 16, "pred_storage": "sparse", "pred_k": 4},
        runtime={"device": "cpu"},
    )
    assert manifest["parts"] == {"novel": "novel", "pred": "pred"}
    assert (out.parent / "novel" / "part-00002.parquet").exists()
    sae = load_sae(spec)
    seq, pos, x = _all_acts(acts)
    novel, pred, total = (load_codes(out, p) for p in ("novel", "pred", "total"))
    assert load_codes(out).part == "novel"
    starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        out_seq = sae(x[a:b].unsqueeze(0))
        want_novel = out_seq.novel[0]
        got_novel = torch.from_numpy(novel.to_dense()[a:b])
        torch.testing.assert_close(got_novel, want_novel.half().float(), atol=1e-3, rtol=1e-3)
        dense_pred = torch.from_numpy(pred.to_dense()[a:b])
        top = out_seq.pred[0].abs().topk(4, dim=-1).indices
        want_pred = torch.zeros_like(dense_pred).scatter_(-1, top, out_seq.pred[0].gather(-1, top))
        torch.testing.assert_close(dense_pred, want_pred.half().float(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(
        total.to_dense(), novel.to_dense() + pred.to_dense(), atol=1e-2, rtol=1e-2
    )
    assert (pred.l0() <= 4).all() and manifest["sae_arch"]["kind"] == "temporal"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encode_temporal_dense_pred_is_exact(tmp_path: Path, dtype: str) -> None:
    """The default stores predictable codes dense: every analysis reads the SAE's own values."""
    acts = write_acts(tmp_path / "acts", LENGTHS, DIMIN, seed=3)
    conf = _conf()
    write_temporal(tmp_path / "temporal", conf, _state(conf))
    spec = {"name": "t", "format": "temporal", "path": str(tmp_path / "temporal")}
    out = tmp_path / "codes" / "manifest.json"
    cfg = {"batch_tokens": 16, "pred_dtype": dtype, "values_dtype": dtype}
    manifest = enc.encode_sae(acts, spec, out, encode_cfg=cfg, runtime={"device": "cpu"})
    assert manifest["storage"] == {"novel": "sparse", "pred": "dense"}
    sae = load_sae(spec)
    seq, pos, x = _all_acts(acts)
    pred = load_codes(out, "pred")
    assert isinstance(pred, DenseCodes) and pred.codes_NF.dtype == np.dtype(dtype)
    total = load_codes(out, "total", dense=True)
    novel = load_codes(out, "novel", dense=True)
    assert isinstance(novel, DenseCodes) and part_storage(out, "total") == "dense"
    starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]
    tol = 1e-5 if dtype == "float32" else 1e-3  # batching changes fp32 rounding only
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        o = sae(x[a:b].unsqueeze(0))
        want = o.pred[0].to(getattr(torch, dtype)).float()
        torch.testing.assert_close(torch.from_numpy(pred.to_dense()[a:b]), want, atol=tol, rtol=tol)
        want_total = (o.pred[0] + o.novel[0]) if dtype == "float32" else None
        if want_total is not None:  # values_dtype float32: novel, hence total, exact too
            got_total = torch.from_numpy(total.codes_NF[a:b])
            torch.testing.assert_close(got_total, want_total, atol=tol, rtol=tol)
    np.testing.assert_array_equal(total.codes_NF, novel.codes_NF + pred.to_dense())
    # the sparse view analyses take is the same numbers, all of them
    csr = pred.to_scipy()
    assert csr.nnz == np.count_nonzero(pred.codes_NF)
    np.testing.assert_array_equal(csr.toarray(), pred.to_dense())
    assert manifest["nnz"]["pred"] == csr.nnz
    assert load_codes(out, "novel").values.dtype == np.dtype(dtype)
    # resumes: a second run with the same settings keeps the shards
    again = enc.encode_sae(acts, spec, out, encode_cfg=cfg, runtime={"device": "cpu"})
    assert again["config_hash"] == manifest["config_hash"]
    with pytest.raises(ConfigError, match="needs encode.pred_storage: sparse"):
        enc.encode_settings({"pred_k": 8})


def test_temporal_needs_whole_sequences(tmp_path: Path) -> None:
    folder = tmp_path / "acts"
    acts = write_acts(folder, [[4, 4]], DIMIN)
    table = pq.read_table(folder / "part-00000.parquet")
    pos = table.column("pos").to_numpy().copy()
    pos[[1, 2]] = pos[[2, 1]]
    table = table.set_column(1, "pos", pa.array(pos, pa.int32()))
    pq.write_table(table, folder / "part-00000.parquet")
    conf = _conf()
    write_temporal(tmp_path / "t", conf, _state(conf))
    with pytest.raises(DataError, match="row 1 .* has pos 2, expected 1; a temporal SAE needs"):
        enc.encode_sae(
            acts, {"format": "temporal", "path": str(tmp_path / "t")}, tmp_path / "c" / "m.json"
        )


def test_d_model_mismatch_and_bad_settings(tmp_path: Path) -> None:
    acts = write_acts(tmp_path / "acts", [[3]], 24)
    write_saelens(tmp_path / "sae", "topk")
    spec = {"name": "mine", "format": "saelens", "path": str(tmp_path / "sae")}
    with pytest.raises(ConfigError, match=r"saes\.mine on .*d_in=16 .*d_model=24"):
        enc.encode_sae(acts, spec, tmp_path / "c" / "manifest.json")
    with pytest.raises(ConfigError, match="encode.batch_tokens = 0"):
        enc.encode_settings({"batch_tokens": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        enc.encode_settings({"batch": 3})


def test_sequence_batches_respect_token_budget() -> None:
    offsets = np.cumsum([0, 5, 7, 3, 6, 1, 8])
    batches = enc.sequence_batches(offsets, 14)
    assert batches == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert enc.sequence_batches(offsets, 1) == [(i, i + 1) for i in range(6)]


def test_codes_select_and_empty() -> None:
    c = Codes(
        np.array([0, 0, 1], np.int32),
        np.array([0, 1, 0], np.int32),
        np.array([0, 2, 2, 3]),
        np.array([1, 3, 0], np.int32),
        np.array([1, 2, 3], np.float16),
        4,
    )
    sub = c.select(np.array([True, False, True]))
    assert sub.to_dense().tolist() == [[0, 1, 0, 2], [3, 0, 0, 0]]
    assert c.to_torch_sparse().shape == (3, 4)
    assert c.select(np.zeros(3, bool)).nnz == 0
