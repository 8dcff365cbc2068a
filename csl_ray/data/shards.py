"""Shard format version 1 (docs/data.md): `manifest.json` + `<split>/part-NNNNN.parquet` of encoded images and masks.

A dataset root holds one folder per split (`labeled`, `unlabeled`, `val`) of Parquet files with the columns
`id` (string), `image` (the encoded JPEG/PNG bytes), `mask` (PNG of uint8 class ids, 255 = ignore; null where there
is no label), `height`, `width` (int32), and a manifest naming the classes and, for every file, its row count,
row-group sizes and sha256. Writing is atomic (a temp folder renamed into place) and idempotent (writing the same
rows again finds the identical dataset and keeps it).

    manifest = write_dataset("data/voc", name="voc", class_names=names, splits={"labeled": records, ...})
    verify("data/voc")
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("labeled", "unlabeled", "val")
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary()),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
)
MAX_SHARD_ROWS = 2048
MAX_SHARD_BYTES = 256 << 20
# Row groups are the pipeline's unit of work (one read + augment task), so they are kept small: a 64-row group of
# 321-px JPEGs is a few MB and a cluster gets hundreds of them per epoch to spread over its CPUs.
ROW_GROUP_ROWS = 64
_MANIFEST_KEYS = ("format_version", "name", "num_classes", "class_names", "ignore_index", "splits", "files")


class ShardError(ValueError):
    """A dataset root that cannot be written or read; the message names the file and the problem."""


@dataclass(frozen=True)
class Record:
    """One row of a shard: encoded bytes plus the image size (checked against the mask by the converter)."""

    id: str
    image: bytes
    mask: bytes | None
    height: int
    width: int


def encode_mask(mask: np.ndarray) -> bytes:
    """uint8 class ids [H, W] -> PNG bytes (8-bit grayscale, so any reader sees the ids, not a palette)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes written by `encode_mask` -> uint8 class ids [H, W]."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (any format PIL reads; grayscale/CMYK converted) -> uint8 RGB [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def filesystem(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a dataset root: a local folder, s3://..., gs://... ."""
    text = str(root)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Loads and checks `<root>/manifest.json`; raises ShardError naming the file."""
    fs, path = filesystem(root)
    name = f"{path}/{MANIFEST}"
    try:
        with fs.open_input_stream(name) as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError as err:
        raise ShardError(f"{name}: no manifest (not a dataset root written by jobs/prepare_data.py)") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"{name}: unreadable manifest: {err}") from err
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ShardError(f"{name}: missing keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ShardError(f"{name}: format_version {manifest['format_version']!r}; this code reads {FORMAT_VERSION}")
    return manifest


def split_files(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The manifest's file entries of one split (path relative to the root, rows, row_groups, bytes, sha256)."""
    if split not in manifest["splits"]:
        raise ShardError(f"dataset {manifest['name']!r} has no split {split!r} (it has {sorted(manifest['splits'])})")
    return [entry for entry in manifest["files"] if entry["split"] == split]


def read_split(root: str | os.PathLike, split: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of one split as one Arrow table, in manifest order (for small splits, tools and tests)."""
    fs, path = filesystem(root)
    entries = split_files(read_manifest(root), split)
    tables = [pq.read_table(f"{path}/{entry['path']}", columns=columns, filesystem=fs) for entry in entries]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_split(
    folder: Path, split: str, records: Iterable[Record], max_rows: int, max_bytes: int, row_group_rows: int
) -> list[dict[str, Any]]:
    """Writes one split as part files of at most `max_rows` rows / about `max_bytes` bytes; returns their entries."""
    (folder / split).mkdir(parents=True)
    entries: list[dict[str, Any]] = []
    buffer: list[Record] = []
    size = 0

    def flush() -> None:
        nonlocal size
        relative = f"{split}/part-{len(entries):05d}.parquet"
        table = pa.table(
            {
                "id": [r.id for r in buffer],
                "image": [r.image for r in buffer],
                "mask": [r.mask for r in buffer],
                "height": [r.height for r in buffer],
                "width": [r.width for r in buffer],
            },
            schema=SCHEMA,
        )
        # No compression: the payload is already JPEG/PNG, and snappy would only cost CPU at read time.
        pq.write_table(table, folder / relative, row_group_size=row_group_rows, compression="none")
        groups = [min(row_group_rows, len(buffer) - start) for start in range(0, len(buffer), row_group_rows)]
        entries.append(
            {
                "path": relative,
                "split": split,
                "rows": len(buffer),
                "row_groups": groups,
                "bytes": (folder / relative).stat().st_size,
                "sha256": file_sha256(folder / relative),
            }
        )
        buffer.clear()
        size = 0

    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ShardError(f"split {split!r}: duplicate id {record.id!r}")
        seen.add(record.id)
        buffer.append(record)
        size += len(record.image) + len(record.mask or b"")
        if len(buffer) >= max_rows or size >= max_bytes:
            flush()
    if buffer:
        flush()
    if not entries:
        raise ShardError(f"split {split!r} has no rows")
    return entries


def _same_dataset(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}


def write_dataset(
    out: str | os.PathLike,
    *,
    name: str,
    class_names: list[str],
    splits: Mapping[str, Iterable[Record]],
    ignore_index: int = 255,
    source: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    overwrite: bool = False,
    max_rows: int = MAX_SHARD_ROWS,
    max_bytes: int = MAX_SHARD_BYTES,
    row_group_rows: int = ROW_GROUP_ROWS,
    before_publish: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Writes a dataset root atomically: everything goes to a temp folder beside `out`, renamed at the end.

    Records are written in the order given (shards are deterministic for the same records), so re-running on the
    same inputs gives byte-identical files. If `out` already holds that dataset it is kept and this is a no-op; if
    it holds another one, ShardError unless `overwrite`. Two processes racing to write the same dataset both
    succeed (the second finds the first's result).

    Args:
        out: the dataset root to create (local path).
        name: dataset name stored in the manifest.
        class_names: one name per class id; num_classes = len(class_names).
        splits: split name -> records, each split non-empty.
        ignore_index: mask value of unlabelled pixels.
        source: free-form provenance stored in the manifest (e.g. the converter's input fingerprint), or a
            callable returning it once the rows are written (for statistics gathered while writing); it does not
            take part in the "same dataset" check.
        overwrite: replace a different dataset already at `out`.
        max_rows, max_bytes, row_group_rows: shard and row-group sizes.
        before_publish: called once everything is written, before the rename; raising there aborts the write
            (the converter validates every sample first and fails without publishing anything).

    Returns:
        The manifest.
    """
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        files: list[dict[str, Any]] = []
        for split, records in splits.items():
            files.extend(_write_split(tmp, split, records, max_rows, max_bytes, row_group_rows))
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "num_classes": len(class_names),
            "class_names": list(class_names),
            "ignore_index": ignore_index,
            "splits": {split: sum(f["rows"] for f in files if f["split"] == split) for split in splits},
            "files": files,
            "source": (source() if callable(source) else source) or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if before_publish is not None:
            before_publish()
        _publish(tmp, out, manifest, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _publish(tmp: Path, out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Renames `tmp` to `out`, resolving an existing `out` (same dataset: keep it; different: overwrite or fail)."""
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.exists():
            raise
    try:
        existing = read_manifest(out)
    except ShardError:
        existing = None
    if existing is not None and _same_dataset(existing, manifest):
        return
    if not overwrite:
        raise ShardError(f"{out}: already holds a different dataset; remove it or pass overwrite (--overwrite)")
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, trash)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def verify(root: str | os.PathLike) -> dict[str, Any]:
    """Re-checks every file of a dataset root against its manifest (existence, sha256, row counts, schema).

    Returns:
        {"name", "splits" (rows per split), "files", "bytes"} when everything matches.

    Raises:
        ShardError listing every problem found, one per line, each naming the file.
    """
    manifest = read_manifest(root)
    fs, path = filesystem(root)
    problems = []
    total = 0
    for entry in manifest["files"]:
        name = f"{path}/{entry['path']}"
        digest = hashlib.sha256()
        try:
            with fs.open_input_stream(name) as stream:
                for chunk in iter(lambda stream=stream: stream.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if digest.hexdigest() != entry["sha256"]:
            problems.append(f"{name}: sha256 {digest.hexdigest()} != manifest {entry['sha256']}")
            continue
        try:
            metadata = pq.ParquetFile(name, filesystem=fs).metadata
        except (OSError, pa.ArrowException) as err:
            problems.append(f"{name}: unreadable: {err}")
            continue
        if metadata.num_rows != entry["rows"]:
            problems.append(f"{name}: {metadata.num_rows} rows != manifest {entry['rows']}")
        if not metadata.schema.to_arrow_schema().equals(SCHEMA):
            problems.append(f"{name}: schema {metadata.schema.to_arrow_schema()} != format {FORMAT_VERSION}")
        total += entry["bytes"]
    for split, rows in manifest["splits"].items():
        listed = sum(e["rows"] for e in manifest["files"] if e["split"] == split)
        if listed != rows:
            problems.append(f"{path}/{MANIFEST}: split {split!r} has {rows} rows but its files list {listed}")
    if problems:
        raise ShardError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(problems))
    return {"name": manifest["name"], "splits": manifest["splits"], "files": len(manifest["files"]), "bytes": total}
