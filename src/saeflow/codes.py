"""Sparse SAE code shards: writing, reading and the public `load_codes`.

A code directory (`results/codes/{model}/{dataset}/{sae}/`) holds one Parquet shard per activation
shard, per part, and a `manifest.json` written last. Rows are tokens in activation order:
`seq_id` int32, `pos` int32, `feature_ids` list<int32> (ascending), `values` list<float16>
(only the non-zero codes; list<float32> with `encode.values_dtype: float32`, exact). That is 6
bytes per non-zero plus a few bytes per token, against 4 bytes per *feature* for dense codes.

Parts: a per-token SAE has one part, `codes`, in the directory itself. A temporal SAE has `novel`
(the sparse TopK/ReLU codes of the unpredictable residual) and `pred` (the predictable codes) in
sub-directories; the virtual part `total` is their sum, computed on read.

Predictable codes are dense (about half of all features are non-zero on every token), so by default
they are stored exactly, as dense rows: a *dense shard* has the same name and the columns `seq_id`,
`pos`, `codes` fixed_size_binary(itemsize * d_sae) holding the raw float32 (or float16) row, with
the dtype in the schema metadata. Readers tell the two layouts apart by their columns; a dense
shard reads back as `DenseCodes`, which offers the same methods as `Codes` (`to_scipy`, `select`,
`to_dense`, ...), so every analysis sees the exact values. `encode.pred_storage: sparse` (with
`pred_k`) is the explicit lossy alternative.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saeflow import verify
from saeflow.errors import DataError
from saeflow.io import atomic_path

CODES_FORMAT = "saeflow.codes/1"
SHARD_EXT = "parquet"
PARQUET_OPTS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    "write_statistics": False,
}
SCHEMA = pa.schema(
    [
        ("seq_id", pa.int32()),
        ("pos", pa.int32()),
        ("feature_ids", pa.list_(pa.int32())),
        ("values", pa.list_(pa.float16())),
    ]
)
SCHEMA_F32 = SCHEMA.set(3, pa.field("values", pa.list_(pa.float32())))
TEMPORAL_PARTS = ("novel", "pred")
DENSE_COLUMN = "codes"
DENSE_DTYPE_KEY = b"saeflow.codes.dtype"
DENSE_DTYPES = ("float32", "float16")


@dataclass
class Codes:
    """Sparse codes of N tokens in CSR layout: row i owns entries indptr[i]:indptr[i+1]."""

    seq_ids: np.ndarray  # int32 [N]
    positions: np.ndarray  # int32 [N]
    indptr: np.ndarray  # int64 [N+1]
    feature_ids: np.ndarray  # int32 [nnz], ascending within a row
    values: np.ndarray  # float16 (or float32) [nnz]
    d_sae: int
    part: str = "codes"

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def l0(self) -> np.ndarray:
        """Non-zeros per token."""
        return np.diff(self.indptr)

    def to_scipy(self):
        """`scipy.sparse.csr_matrix` [N, d_sae] in float32 (fast row/column statistics)."""
        from scipy.sparse import csr_matrix

        return csr_matrix(
            (self.values.astype(np.float32), self.feature_ids, self.indptr),
            shape=(len(self), self.d_sae),
        )

    def to_torch_sparse(self, dtype: Any = None):
        """Coalesced `torch.sparse_coo_tensor` [N, d_sae] (float32 unless `dtype` is given)."""
        import torch

        rows = np.repeat(np.arange(len(self), dtype=np.int64), self.l0())
        index = torch.from_numpy(np.stack([rows, self.feature_ids.astype(np.int64)]))
        vals = torch.from_numpy(self.values.astype(np.float32))
        out = torch.sparse_coo_tensor(
            index, vals, (len(self), self.d_sae), is_coalesced=True, check_invariants=False
        )
        return out if dtype is None else out.to(dtype)

    def to_dense(self) -> np.ndarray:
        """Dense float32 [N, d_sae]; only for small selections."""
        out = np.zeros((len(self), self.d_sae), dtype=np.float32)
        rows = np.repeat(np.arange(len(self)), self.l0())
        out[rows, self.feature_ids] = self.values
        return out

    def select(self, mask: np.ndarray) -> Codes:
        """The tokens where `mask` (bool [N]) is true."""
        idx = np.flatnonzero(mask)
        starts, stops = self.indptr[idx], self.indptr[idx + 1]
        lengths = stops - starts
        take = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        take = take + np.arange(int(lengths.sum()))
        return Codes(
            self.seq_ids[idx],
            self.positions[idx],
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.feature_ids[take],
            self.values[take],
            self.d_sae,
            self.part,
        )


@dataclass
class DenseCodes:
    """Dense codes of N tokens (`codes_NF` float32 or float16), with the methods of `Codes`."""

    seq_ids: np.ndarray  # int32 [N]
    positions: np.ndarray  # int32 [N]
    codes_NF: np.ndarray  # noqa: N815 - float32 or float16 [N, d_sae]
    d_sae: int
    part: str = "pred"

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.codes_NF))

    def l0(self) -> np.ndarray:
        """Non-zeros per token."""
        return np.count_nonzero(self.codes_NF, axis=1)

    def to_scipy(self):
        """Exact `scipy.sparse.csr_matrix` [N, d_sae] float32 of the non-zero entries."""
        from scipy.sparse import csr_matrix

        return csr_matrix(self.codes_NF.astype(np.float32, copy=False))

    def to_torch_sparse(self, dtype: Any = None):
        import torch

        out = torch.from_numpy(self.to_dense()).to_sparse_coo().coalesce()
        return out if dtype is None else out.to(dtype)

    def to_dense(self) -> np.ndarray:
        """Dense float32 [N, d_sae] (no copy when already float32)."""
        return self.codes_NF.astype(np.float32, copy=False)

    def to_sparse(self) -> Codes:
        """The exact CSR `Codes` (values kept in float32)."""
        csr = self.to_scipy()
        return Codes(
            self.seq_ids,
            self.positions,
            csr.indptr.astype(np.int64),
            csr.indices.astype(np.int32),
            csr.data.astype(np.float32),
            self.d_sae,
            self.part,
        )

    def select(self, mask: np.ndarray) -> DenseCodes:
        """The tokens where `mask` (bool [N]) is true."""
        idx = np.flatnonzero(mask)
        return DenseCodes(
            self.seq_ids[idx], self.positions[idx], self.codes_NF[idx], self.d_sae, self.part
        )


AnyCodes = Codes | DenseCodes


def as_dense(codes: AnyCodes) -> DenseCodes:
    """Dense float32 codes of either layout (exact)."""
    if isinstance(codes, DenseCodes):
        return codes
    return DenseCodes(codes.seq_ids, codes.positions, codes.to_dense(), codes.d_sae, codes.part)


def concat_codes(parts: list[AnyCodes]) -> AnyCodes:
    """Concatenate shards (same d_sae and part) in order; dense if any shard is dense."""
    if not parts:
        raise DataError("no code shards to concatenate")
    if any(isinstance(c, DenseCodes) for c in parts):
        dense = [as_dense(c) for c in parts]
        dtype = np.result_type(*[c.codes_NF.dtype for c in dense])
        return DenseCodes(
            np.concatenate([c.seq_ids for c in dense]),
            np.concatenate([c.positions for c in dense]),
            np.concatenate([c.codes_NF.astype(dtype, copy=False) for c in dense]),
            parts[0].d_sae,
            parts[0].part,
        )
    offsets = np.cumsum([0] + [c.nnz for c in parts[:-1]])
    indptr = np.concatenate(
        [np.zeros(1, np.int64)]
        + [c.indptr[1:] + off for c, off in zip(parts, offsets, strict=True)]
    )
    return Codes(
        np.concatenate([c.seq_ids for c in parts]),
        np.concatenate([c.positions for c in parts]),
        indptr.astype(np.int64),
        np.concatenate([c.feature_ids for c in parts]),
        np.concatenate([c.values for c in parts]),
        parts[0].d_sae,
        parts[0].part,
    )


def write_code_shard(path: str | os.PathLike, codes: AnyCodes) -> None:
    """Write one shard atomically (temporary sibling, then rename); dense codes stay dense."""
    if isinstance(codes, DenseCodes):
        write_dense_shard(path, codes)
        return
    offsets = pa.array(codes.indptr.astype(np.int32), type=pa.int32())
    vtype = np.float32 if codes.values.dtype == np.float32 else np.float16
    schema = SCHEMA if vtype == np.float16 else SCHEMA_F32
    table = pa.Table.from_arrays(
        [
            pa.array(codes.seq_ids.astype(np.int32, copy=False)),
            pa.array(codes.positions.astype(np.int32, copy=False)),
            pa.ListArray.from_arrays(offsets, pa.array(codes.feature_ids.astype(np.int32))),
            pa.ListArray.from_arrays(offsets, pa.array(codes.values.astype(vtype))),
        ],
        schema=schema,
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTS)


def list_column_csr(column: pa.ChunkedArray | pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """A parquet list column as CSR: (indptr int64 starting at 0, flat values), no row objects.

    A list array can be a slice of a larger buffer, so the offsets are rebased to 0 and the values
    cut to the span its rows cover.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    indptr = arr.offsets.to_numpy().astype(np.int64)
    start, stop = int(indptr[0]), int(indptr[-1])
    return indptr - start, arr.values.to_numpy(zero_copy_only=False)[start:stop]


def write_dense_shard(path: str | os.PathLike, codes: DenseCodes) -> None:
    """Dense rows as raw bytes in one fixed_size_binary column (no compression: ~1 GB/s)."""
    dtype = np.dtype(codes.codes_NF.dtype).name
    if dtype not in DENSE_DTYPES:
        raise DataError(
            f"{path}: dense codes must be one of {', '.join(DENSE_DTYPES)}, got {dtype}"
        )
    rows = np.ascontiguousarray(codes.codes_NF)
    n, width = len(codes), codes.d_sae * rows.itemsize
    if rows.shape != (n, codes.d_sae):
        raise DataError(f"{path}: dense codes of shape {rows.shape}, expected ({n}, {codes.d_sae})")
    binary = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(rows.view(np.uint8).reshape(-1))]
    )
    schema = pa.schema(
        [("seq_id", pa.int32()), ("pos", pa.int32()), (DENSE_COLUMN, pa.binary(width))],
        metadata={DENSE_DTYPE_KEY: dtype.encode()},
    )
    table = pa.Table.from_arrays(
        [
            pa.array(codes.seq_ids.astype(np.int32, copy=False)),
            pa.array(codes.positions.astype(np.int32, copy=False)),
            binary,
        ],
        schema=schema,
    )
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            compression={"seq_id": "zstd", "pos": "zstd", DENSE_COLUMN: "none"},
            use_dictionary=False,
            write_statistics=False,
        )


def _dense_from_table(table: pa.Table, path: Any, d_sae: int, part: str) -> DenseCodes:
    meta = table.schema.metadata or {}
    dtype = np.dtype(meta.get(DENSE_DTYPE_KEY, b"float32").decode())
    col = table.column(DENSE_COLUMN).combine_chunks()
    n, width = len(col), d_sae * dtype.itemsize
    if col.type.byte_width != width:
        raise DataError(
            f"{path}: dense code rows are {col.type.byte_width} bytes, expected {width}"
        )
    raw = np.frombuffer(col.buffers()[1], np.uint8, count=n * width, offset=col.offset * width)
    return DenseCodes(
        table.column("seq_id").to_numpy().astype(np.int32),
        table.column("pos").to_numpy().astype(np.int32),
        raw.view(dtype).reshape(n, d_sae).copy(),
        d_sae,
        part,
    )


def read_code_shard(path: str | os.PathLike, d_sae: int, part: str = "codes") -> AnyCodes:
    """Read one shard back: CSR arrays (no per-row Python objects), or `DenseCodes`."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: unreadable code shard ({err})") from None
    if DENSE_COLUMN in table.column_names:
        return _dense_from_table(table, path, d_sae, part)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: code shard lacks column(s) {', '.join(missing)}")
    indptr, ids = list_column_csr(table.column("feature_ids"))
    _, vals = list_column_csr(table.column("values"))
    return Codes(
        table.column("seq_id").to_numpy().astype(np.int32),
        table.column("pos").to_numpy().astype(np.int32),
        indptr,
        ids.astype(np.int32),
        vals.astype(np.float32 if vals.dtype == np.float32 else np.float16),
        d_sae,
        part,
    )


def add_codes(a: AnyCodes, b: AnyCodes, part: str = "total") -> AnyCodes:
    """Per-token sum of two code sets over the same tokens (novel + pred = total).

    Dense if either is dense (float32, exact); otherwise CSR in the wider of the two value dtypes.
    """
    if len(a) != len(b) or not np.array_equal(a.seq_ids, b.seq_ids):
        raise DataError("cannot add code parts that cover different tokens")
    if isinstance(a, DenseCodes) or isinstance(b, DenseCodes):
        total_NF = as_dense(a).to_dense() + as_dense(b).to_dense()
        return DenseCodes(a.seq_ids, a.positions, total_NF, a.d_sae, part)
    total = (a.to_scipy() + b.to_scipy()).tocsr()
    total.sum_duplicates()
    total.sort_indices()
    total.eliminate_zeros()
    return Codes(
        a.seq_ids,
        a.positions,
        total.indptr.astype(np.int64),
        total.indices.astype(np.int32),
        total.data.astype(np.result_type(a.values.dtype, b.values.dtype)),
        a.d_sae,
        part,
    )


def _resolve(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    directory = Path(path)
    if directory.name == "manifest.json":
        directory = directory.parent
    manifest = verify.read_manifest(directory)
    if manifest.get("format") != CODES_FORMAT:
        raise DataError(f"{directory}/manifest.json: not a saeflow code directory")
    verify.codes_manifest(directory, manifest)
    return directory, manifest


def _part_name(manifest: dict[str, Any], part: str | None, where: Path) -> str:
    parts = manifest["parts"]
    if "codes" in parts:
        if part in (None, "codes", "novel", "total"):
            return "codes"
        raise DataError(f"{where}: part={part!r} needs a temporal SAE; these codes have one part")
    if part is None:
        return "novel"
    if part not in (*parts, "total"):
        raise DataError(f"{where}: part={part!r} is not one of {', '.join([*parts, 'total'])}")
    return part


def iter_codes(
    path: str | os.PathLike, part: str | None = None, *, dense: bool = False
) -> Iterator[AnyCodes]:
    """Yield the codes shard by shard (memory bounded by one shard).

    Shards come back in their stored layout (`Codes` or `DenseCodes`); `dense=True` turns every
    shard into `DenseCodes` (float32 or the stored float16).
    """
    directory, manifest = _resolve(path)
    name = _part_name(manifest, part, directory)
    d_sae = int(manifest["d_sae"])
    for shard in manifest["shards"]:
        if name == "total":
            novel = read_code_shard(directory / manifest["parts"]["novel"] / shard, d_sae, "novel")
            pred = read_code_shard(directory / manifest["parts"]["pred"] / shard, d_sae, "pred")
            codes = add_codes(novel, pred)
        else:
            codes = read_code_shard(directory / manifest["parts"][name] / shard, d_sae, name)
        yield as_dense(codes) if dense else codes


def shard_readers(path: str | os.PathLike, part: str | None = None) -> list[Any]:
    """One zero-argument reader per shard (each returns that shard's `Codes`), for random access
    to shards without holding them: streaming stages that pair or revisit shards use these."""
    directory, manifest = _resolve(path)
    name = _part_name(manifest, part, directory)
    d_sae = int(manifest["d_sae"])
    parts = manifest["parts"]

    def reader(shard: str) -> Any:
        if name == "total":
            return lambda: add_codes(
                read_code_shard(directory / parts["novel"] / shard, d_sae, "novel"),
                read_code_shard(directory / parts["pred"] / shard, d_sae, "pred"),
            )
        return lambda: read_code_shard(directory / parts[name] / shard, d_sae, name)

    return [reader(shard) for shard in manifest["shards"]]


def shard_keys(
    path: str | os.PathLike, part: str | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(seq_ids, positions) of every shard, reading only those two columns (8 bytes a token)."""
    directory, manifest = _resolve(path)
    name = _part_name(manifest, part, directory)
    sub = manifest["parts"]["novel" if name == "total" else name]
    out = []
    for shard in manifest["shards"]:
        try:
            table = pq.read_table(directory / sub / shard, columns=["seq_id", "pos"])
        except (OSError, pa.ArrowInvalid, KeyError) as err:
            raise DataError(f"{directory / sub / shard}: unreadable code shard ({err})") from None
        out.append(
            (
                table.column("seq_id").to_numpy().astype(np.int32),
                table.column("pos").to_numpy().astype(np.int32),
            )
        )
    return out


def load_codes(
    path: str | os.PathLike, part: str | None = None, *, dense: bool = False
) -> AnyCodes:
    """All codes of a code directory (or its manifest.json).

    `part`: None (a per-token SAE's codes, or a temporal SAE's `novel` codes), `novel`, `pred` or
    `total` (novel + pred). Returns `Codes` (CSR) for sparse parts and `DenseCodes` for dense ones
    (exact predictable codes, the default); `dense=True` always returns `DenseCodes`, whose
    `codes_NF` is the [N, d_sae] array in token order (`seq_ids`, `positions`).
    """
    directory, manifest = _resolve(path)
    chunks = list(iter_codes(directory, part, dense=dense))
    if not chunks:
        name = _part_name(manifest, part, directory)
        d_sae = int(manifest["d_sae"])
        if dense:
            empty = np.zeros(0, np.int32)
            return DenseCodes(empty, empty.copy(), np.zeros((0, d_sae), np.float32), d_sae, name)
        return Codes(
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            np.zeros(1, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.float16),
            d_sae,
            name,
        )
    return concat_codes(chunks)


def part_storage(path: str | os.PathLike, part: str | None = None) -> str:
    """ "dense" or "sparse": how a part is stored (`total` is dense when `pred` is)."""
    directory, manifest = _resolve(path)
    name = _part_name(manifest, part, directory)
    storage = manifest.get("storage", {})
    if name == "total":
        return "dense" if "dense" in (storage.get("novel"), storage.get("pred")) else "sparse"
    return storage.get(name, "sparse")


def load_attention(path: str | os.PathLike, seq_id: int) -> np.ndarray:
    """A temporal SAE's attention maps [n_attn_layers, n_heads, L, L] of one sequence.

    Written by `encode_sae` for the seq_ids in `encode.attention_maps` (the reference forward's
    `return_graph`); row t is position t's attention over its context positions 0..t.
    """
    directory, manifest = _resolve(path)
    files = manifest.get("attention", {})
    if str(seq_id) not in files:
        have = ", ".join(sorted(files, key=int)) or "none (set encode.attention_maps)"
        raise DataError(f"{directory}: no attention maps for seq_id {seq_id} (have: {have})")
    from safetensors.numpy import load_file

    return load_file(str(directory / files[str(seq_id)]))["attn_graphs"]
