"""Sparse SAE code shards: writing, reading and the public `load_codes`.

A code directory (`results/codes/{model}/{dataset}/{sae}/`) holds one Parquet shard per activation
shard, per part, and a `manifest.json` written last. Rows are tokens in activation order:
`seq_id` int32, `pos` int32, `feature_ids` list<int32> (ascending), `values` list<float16>
(only the non-zero codes). That is 6 bytes per non-zero plus a few bytes per token, against
4 bytes per *feature* for dense codes.

Parts: a per-token SAE has one part, `codes`, in the directory itself. A temporal SAE has `novel`
(the sparse TopK/ReLU codes of the unpredictable residual) and `pred` (the predictable codes, which
are dense, so only the `pred_k` largest by magnitude per token are kept) in sub-directories; the
virtual part `total` is their sum, computed on read.
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

from saeflow.errors import DataError
from saeflow.io import atomic_path, read_manifest

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
TEMPORAL_PARTS = ("novel", "pred")


@dataclass
class Codes:
    """Sparse codes of N tokens in CSR layout: row i owns entries indptr[i]:indptr[i+1]."""

    seq_ids: np.ndarray  # int32 [N]
    positions: np.ndarray  # int32 [N]
    indptr: np.ndarray  # int64 [N+1]
    feature_ids: np.ndarray  # int32 [nnz], ascending within a row
    values: np.ndarray  # float16 [nnz]
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


def concat_codes(parts: list[Codes]) -> Codes:
    """Concatenate shards (same d_sae and part) in order."""
    if not parts:
        raise DataError("no code shards to concatenate")
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


def write_code_shard(path: str | os.PathLike, codes: Codes) -> None:
    """Write one shard atomically (temporary sibling, then rename)."""
    offsets = pa.array(codes.indptr.astype(np.int32), type=pa.int32())
    table = pa.Table.from_arrays(
        [
            pa.array(codes.seq_ids.astype(np.int32, copy=False)),
            pa.array(codes.positions.astype(np.int32, copy=False)),
            pa.ListArray.from_arrays(offsets, pa.array(codes.feature_ids.astype(np.int32))),
            pa.ListArray.from_arrays(offsets, pa.array(codes.values.astype(np.float16))),
        ],
        schema=SCHEMA,
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


def read_code_shard(path: str | os.PathLike, d_sae: int, part: str = "codes") -> Codes:
    """Read one shard back into CSR arrays (no per-row Python objects)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: unreadable code shard ({err})") from None
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
        vals.astype(np.float16),
        d_sae,
        part,
    )


def add_codes(a: Codes, b: Codes, part: str = "total") -> Codes:
    """Per-token sum of two code sets over the same tokens (novel + pred = total)."""
    if len(a) != len(b) or not np.array_equal(a.seq_ids, b.seq_ids):
        raise DataError("cannot add code parts that cover different tokens")
    total = (a.to_scipy() + b.to_scipy()).tocsr()
    total.sum_duplicates()
    total.sort_indices()
    total.eliminate_zeros()
    return Codes(
        a.seq_ids,
        a.positions,
        total.indptr.astype(np.int64),
        total.indices.astype(np.int32),
        total.data.astype(np.float16),
        a.d_sae,
        part,
    )


def _resolve(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    directory = Path(path)
    if directory.name == "manifest.json":
        directory = directory.parent
    manifest = read_manifest(directory)
    if manifest.get("format") != CODES_FORMAT:
        raise DataError(f"{directory}/manifest.json: not a saeflow code directory")
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


def iter_codes(path: str | os.PathLike, part: str | None = None) -> Iterator[Codes]:
    """Yield the codes shard by shard (memory bounded by one shard)."""
    directory, manifest = _resolve(path)
    name = _part_name(manifest, part, directory)
    d_sae = int(manifest["d_sae"])
    for shard in manifest["shards"]:
        if name == "total":
            novel = read_code_shard(directory / manifest["parts"]["novel"] / shard, d_sae, "novel")
            pred = read_code_shard(directory / manifest["parts"]["pred"] / shard, d_sae, "pred")
            yield add_codes(novel, pred)
        else:
            yield read_code_shard(directory / manifest["parts"][name] / shard, d_sae, name)


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


def load_codes(path: str | os.PathLike, part: str | None = None) -> Codes:
    """All codes of a code directory (or its manifest.json) as one `Codes`.

    `part`: None (a per-token SAE's codes, or a temporal SAE's `novel` codes), `novel`, `pred` or
    `total` (novel + pred).
    """
    directory, manifest = _resolve(path)
    chunks = list(iter_codes(directory, part))
    if not chunks:
        name = _part_name(manifest, part, directory)
        return Codes(
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            np.zeros(1, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.float16),
            int(manifest["d_sae"]),
            name,
        )
    return concat_codes(chunks)
