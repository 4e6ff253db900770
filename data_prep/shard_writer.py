"""Checks a split's images and writes its image and caption shards, in parallel.

The format is `dual_path.shard_format`'s. Two phases, both run by a WorkerPool:

1. `check_split_images` decodes every image of a split once (`images.check_image`)
   and keeps, per image, (height, width, conversion) or the reason it failed. The
   results are saved atomically in `<shard_dir>/build-cache/<split>-image-check.json`
   (with the re-encoded JPEGs of converted images next to it), so a rerun over the
   same, unchanged image files (path, size, mtime) does not decode again.
2. `write_shards` writes the shards the caller planned from those results
   (`plan_image_shards`, `plan_caption_shards`: contiguous blocks of index, so
   reading shards in name order reads the records in index order). Each shard is
   written as `<name>.tmp` and renamed when complete, so a final name never holds a
   partial shard. A shard whose final file exists and whose planned content has not
   changed since it was written (a digest in `build-cache/shard-digests.json`) is
   kept as it is; a changed one is rewritten.

Image shards copy the bytes of RGB JPEG files; converted images come from the cache.
"""
import dataclasses
import hashlib
import json
import multiprocessing
import os
from concurrent import futures
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from data_prep import images
from data_prep.records import ImageRecord
from dual_path import shard_format
from dual_path.atomic_write import TMP_SUFFIX, write_atomically

CACHE_DIR_NAME = "build-cache"
DIGESTS_NAME = "shard-digests.json"
# Images per task handed to a worker at a time in phase 1.
MAX_CHECK_CHUNK = 64
_HASH_BLOCK_BYTES = 1 << 20


def cache_dir(shard_dir: str) -> str:
    return os.path.join(shard_dir, CACHE_DIR_NAME)


def _read_json(path: str):
    with tf.io.gfile.GFile(path, "r") as json_file:
        return json.load(json_file)


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class WorkerPool:
    """Runs a module-level function over items in worker processes.

    Workers are spawned (not forked: the parent has TensorFlow running) once and
    serve both phases; a worker that dies fails the build (BrokenProcessPool) rather
    than hanging it. With num_workers == 1 everything runs in this process.
    """

    def __init__(self, num_workers: int | None = None):
        """num_workers: processes; None means one per CPU."""
        self.num_workers = max(1, num_workers or os.cpu_count() or 1)
        self._executor = None
        if self.num_workers > 1:
            self._executor = futures.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn")
            )

    def map(self, function: Callable, items: Sequence, chunksize: int = 1) -> Iterator:
        """function(item) for each item, in order, as they complete."""
        if self._executor is None:
            return map(function, items)
        return self._executor.map(function, items, chunksize=chunksize)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# Phase 1: checking images.


@dataclasses.dataclass(frozen=True)
class ImageCheck:
    """Phase-1 result for one image: its size and conversion, or why it failed."""

    height: int = 0
    width: int = 0
    conversion: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def _check_one(path_and_converted_path: tuple[str, str]) -> ImageCheck:
    """Worker: checks one image; a converted one is saved as an RGB JPEG."""
    path, converted_path = path_and_converted_path
    try:
        checked = images.check_image(path)
    except images.ImageCheckError as error:
        return ImageCheck(reason=error.reason)
    if checked.conversion is not None:
        tf.io.gfile.makedirs(os.path.dirname(converted_path))
        write_atomically(converted_path, checked.jpeg_bytes)
    return ImageCheck(checked.height, checked.width, checked.conversion)


def _check_cache_path(shard_dir: str, split: str) -> str:
    return os.path.join(cache_dir(shard_dir), f"{split}-image-check.json")


def converted_path(shard_dir: str, split: str, position: int) -> str:
    """Where phase 1 keeps the RGB JPEG of the split's position-th record, if converted."""
    return os.path.join(cache_dir(shard_dir), f"{split}-converted", f"{position:08d}.jpg")


def _files_digest(records: Sequence[ImageRecord]) -> str:
    """sha256 over the image files' paths, sizes and modification times."""
    lines = []
    for record in records:
        try:
            stat = tf.io.gfile.stat(record.path)
            lines.append(f"{record.path}\t{stat.length}\t{stat.mtime_nsec}")
        except tf.errors.NotFoundError:
            lines.append(f"{record.path}\tmissing")
    return _sha256_hex("\n".join(lines))


def _cached_checks(cache_path: str, files_digest: str, shard_dir: str, split: str):
    """The cached checks when they are of the same, unchanged files and complete, else None."""
    if not tf.io.gfile.exists(cache_path):
        return None
    cached = _read_json(cache_path)
    if cached.get("files_sha256") != files_digest:
        return None
    checks = [ImageCheck(**result) for result in cached["results"]]
    for position, check in enumerate(checks):
        if check.conversion and not tf.io.gfile.exists(converted_path(shard_dir, split, position)):
            return None
    return checks


def check_split_images(
    records: Sequence[ImageRecord], shard_dir: str, split: str, pool: WorkerPool
) -> list[ImageCheck]:
    """Phase 1 for one split: one ImageCheck per record, in record order (cached)."""
    if not records:
        return []
    cache_path = _check_cache_path(shard_dir, split)
    files_digest = _files_digest(records)
    checks = _cached_checks(cache_path, files_digest, shard_dir, split)
    if checks is not None:
        return checks
    tf.io.gfile.makedirs(cache_dir(shard_dir))
    work = [
        (record.path, converted_path(shard_dir, split, position))
        for position, record in enumerate(records)
    ]
    chunksize = max(1, min(MAX_CHECK_CHUNK, len(work) // (4 * pool.num_workers)))
    checks = list(pool.map(_check_one, work, chunksize=chunksize))
    contents = {"files_sha256": files_digest, "results": [dataclasses.asdict(c) for c in checks]}
    write_atomically(cache_path, json.dumps(contents).encode("utf-8"))
    return checks


# Phase 2: writing shards.


class ImageEntry(NamedTuple):
    """One image Example to write; jpeg_path holds its RGB JPEG bytes."""

    source_id: str
    filename: str
    jpeg_path: str
    height: int
    width: int
    label: int
    index: int
    file_stamp: str = ""
    """Size and modification time of the source image file; not written, but part of the
    shard digest, so that an image replaced in place rewrites its shard on a rerun."""


def file_stamp(path: str) -> str:
    stat = tf.io.gfile.stat(path)
    return f"{stat.length}:{stat.mtime_nsec}"


class CaptionEntry(NamedTuple):
    """One caption Example to write; token_ids unpadded."""

    token_ids: tuple[int, ...]
    text: str
    caption_id: int
    image_index: int
    label: int


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to write: its final path and its entries (all ImageEntry or all CaptionEntry)."""

    path: str
    entries: tuple

    def digest(self) -> str:
        """sha256 of the planned content, to tell an up-to-date shard from a stale one."""
        return _sha256_hex(json.dumps(self.entries))


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """A complete shard: file name, number of records, sha256 of its bytes, and
    whether this run wrote it (False: kept from an earlier run)."""

    file: str
    records: int
    sha256: str
    written: bool


def _blocks(count: int, num_shards: int) -> list[range]:
    """count items in min(num_shards, count) contiguous blocks of near-equal size."""
    num_blocks = min(num_shards, count)
    if num_blocks == 0:
        return []
    bounds = [count * block // num_blocks for block in range(num_blocks + 1)]
    return [range(bounds[block], bounds[block + 1]) for block in range(num_blocks)]


def _plan(shard_dir: str, split: str, kind: str, entries: Sequence, num_shards: int):
    blocks = _blocks(len(entries), num_shards)
    return [
        ShardTask(
            path=os.path.join(shard_dir, shard_format.shard_name(split, kind, i, len(blocks))),
            entries=tuple(entries[position] for position in block),
        )
        for i, block in enumerate(blocks)
    ]


def plan_image_shards(
    shard_dir: str, split: str, entries: Sequence[ImageEntry], num_shards: int
) -> list[ShardTask]:
    """Image shards of a split; entries in index order. Fewer shards than num_shards
    when there are fewer images, none when there are none."""
    return _plan(shard_dir, split, shard_format.IMAGES, entries, num_shards)


def plan_caption_shards(
    shard_dir: str, split: str, entries: Sequence[CaptionEntry], num_shards: int
) -> list[ShardTask]:
    """Caption shards of a split; entries in caption id order."""
    return _plan(shard_dir, split, shard_format.CAPTIONS, entries, num_shards)


def _serialize(entry) -> bytes:
    if isinstance(entry, ImageEntry):
        with tf.io.gfile.GFile(entry.jpeg_path, "rb") as jpeg_file:
            jpeg_bytes = jpeg_file.read()
        return shard_format.image_example(
            jpeg_bytes,
            source_id=entry.source_id,
            filename=entry.filename,
            height=entry.height,
            width=entry.width,
            label=entry.label,
            index=entry.index,
        )
    return shard_format.caption_example(
        entry.token_ids, entry.text, entry.caption_id, entry.image_index, entry.label
    )


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as shard_file:
        for block in iter(lambda: shard_file.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _count_records(path: str) -> int:
    return int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda count, _: count + 1))


def _write_or_keep(task_and_keep: tuple[ShardTask, bool]) -> ShardInfo:
    """Worker: writes one shard (unless keep) and reads it back for count and checksum."""
    task, keep = task_and_keep
    if not keep:
        tmp_path = task.path + TMP_SUFFIX
        with tf.io.TFRecordWriter(tmp_path) as writer:
            for entry in task.entries:
                writer.write(_serialize(entry))
        tf.io.gfile.rename(tmp_path, task.path, overwrite=True)
    return ShardInfo(
        file=os.path.basename(task.path),
        records=_count_records(task.path),
        sha256=_file_sha256(task.path),
        written=not keep,
    )


def _stale_files(shard_dir: str, splits: Iterable[str], planned_names: set[str]) -> list[str]:
    """Shards of the given splits not in this plan (another shard count), and temp files."""
    stale = []
    for split in splits:
        pattern = os.path.join(shard_dir, f"{split}-*-?????-of-?????{shard_format.SHARD_SUFFIX}")
        stale += [p for p in tf.io.gfile.glob(pattern) if os.path.basename(p) not in planned_names]
        stale += tf.io.gfile.glob(pattern + TMP_SUFFIX)
    return sorted(stale)


def write_shards(
    tasks: Sequence[ShardTask], shard_dir: str, splits: Iterable[str], pool: WorkerPool
) -> list[ShardInfo]:
    """Phase 2: writes the planned shards, keeping the up-to-date ones; in task order.

    Shards and temp files of `splits` that are not in this plan are deleted first, so
    that `shard_format.shard_files` finds only this build's shards.
    Raises:
      RuntimeError: a shard reads back with another record count than planned.
    """
    planned = {os.path.basename(task.path): task.digest() for task in tasks}
    for path in _stale_files(shard_dir, splits, set(planned)):
        tf.io.gfile.remove(path)
    digests_path = os.path.join(cache_dir(shard_dir), DIGESTS_NAME)
    recorded = _read_json(digests_path) if tf.io.gfile.exists(digests_path) else {}
    up_to_date = {
        name: digest
        for name, digest in recorded.items()
        if planned.get(name) == digest and tf.io.gfile.exists(os.path.join(shard_dir, name))
    }
    tf.io.gfile.makedirs(cache_dir(shard_dir))
    write_atomically(digests_path, json.dumps(up_to_date).encode("utf-8"))
    work = [(task, os.path.basename(task.path) in up_to_date) for task in tasks]
    infos = []
    for task, info in zip(tasks, pool.map(_write_or_keep, work)):
        if info.records != len(task.entries):
            raise RuntimeError(
                f"{task.path}: reads back {info.records} records, {len(task.entries)} written"
            )
        if info.written:
            up_to_date[info.file] = planned[info.file]
            write_atomically(digests_path, json.dumps(up_to_date).encode("utf-8"))
        infos.append(info)
    return infos

