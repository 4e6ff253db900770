"""Phase 1 (image checks, cached) and phase 2 (atomic, resumable shard writing)."""
import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

from data_prep import images, shard_writer
from data_prep.records import ImageRecord
from dual_path import shard_format


def _jpeg_file(path, value: int, height: int = 16, width: int = 24) -> str:
    pixels = np.full((height, width, 3), value, np.uint8)
    path.write_bytes(tf.io.encode_jpeg(pixels).numpy())
    return str(path)


def _records(tmp_path, count: int) -> list[ImageRecord]:
    return [
        ImageRecord(f"img{i}", _jpeg_file(tmp_path / f"img{i}.jpg", 20 * i), "train", [f"caption {i}"])
        for i in range(count)
    ]


def _read(path: str, parse) -> list[dict]:
    return [
        {key: value.numpy() for key, value in parse(serialized).items()}
        for serialized in tf.data.TFRecordDataset(path)
    ]


def _image_entries(records, checks) -> list[shard_writer.ImageEntry]:
    return [
        shard_writer.ImageEntry(r.image_id, os.path.basename(r.path), r.path, c.height, c.width, 100 + i, i)
        for i, (r, c) in enumerate(zip(records, checks))
    ]


def _caption_entries(count: int) -> list[shard_writer.CaptionEntry]:
    return [
        shard_writer.CaptionEntry((2, 3 + i, 4), f"caption {i}", i, i // 2, 100 + i // 2)
        for i in range(count)
    ]


def test_check_split_images_reports_each_image_and_caches_results(tmp_path, monkeypatch):
    records = _records(tmp_path, 3)
    png_path = tmp_path / "png_named.jpg"
    png_path.write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    records.append(ImageRecord("png", str(png_path), "train", ["a"]))
    records.append(ImageRecord("gone", str(tmp_path / "gone.jpg"), "train", ["a"]))
    shard_dir = str(tmp_path / "shards")
    with shard_writer.WorkerPool(1) as pool:
        checks = shard_writer.check_split_images(records, shard_dir, "train", pool)
    assert checks[0] == shard_writer.ImageCheck(16, 24, None, None)
    assert checks[3] == shard_writer.ImageCheck(8, 8, images.CONVERSION_PNG, None)
    assert not checks[4].ok and checks[4].reason == images.REASON_MISSING
    converted = tf.io.read_file(shard_writer.converted_path(shard_dir, "train", 3))
    assert tf.io.decode_jpeg(converted, channels=3).shape == (8, 8, 3)

    def must_not_decode(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(images, "check_image", must_not_decode)
    with shard_writer.WorkerPool(1) as pool:
        assert shard_writer.check_split_images(records, shard_dir, "train", pool) == checks
        with pytest.raises(AssertionError, match="decoded"):
            shard_writer.check_split_images(records[:2], shard_dir, "train", pool)
    monkeypatch.undo()
    _jpeg_file(tmp_path / "gone.jpg", 5)  # the missing image turns up: checked again
    with shard_writer.WorkerPool(1) as pool:
        assert shard_writer.check_split_images(records, shard_dir, "train", pool)[4].ok


def test_plans_are_contiguous_blocks_of_index(tmp_path):
    entries = _caption_entries(10)
    tasks = shard_writer.plan_caption_shards(str(tmp_path), "val", entries, 4)
    assert [os.path.basename(t.path) for t in tasks] == [
        shard_format.shard_name("val", shard_format.CAPTIONS, i, 4) for i in range(4)
    ]
    assert [e for task in tasks for e in task.entries] == entries
    assert [len(task.entries) for task in tasks] == [2, 3, 2, 3]
    assert len(shard_writer.plan_caption_shards(str(tmp_path), "val", entries[:3], 16)) == 3
    assert shard_writer.plan_image_shards(str(tmp_path), "test", [], 16) == []


def _write_all(tmp_path, records, num_workers: int = 1):
    shard_dir = str(tmp_path / "shards")
    with shard_writer.WorkerPool(num_workers) as pool:
        checks = shard_writer.check_split_images(records, shard_dir, "train", pool)
        tasks = shard_writer.plan_image_shards(shard_dir, "train", _image_entries(records, checks), 2)
        tasks += shard_writer.plan_caption_shards(shard_dir, "train", _caption_entries(7), 2)
        return shard_dir, tasks, shard_writer.write_shards(tasks, shard_dir, ["train"], pool)


def test_written_shards_read_back_as_planned(tmp_path):
    records = _records(tmp_path, 5)
    shard_dir, tasks, infos = _write_all(tmp_path, records)
    image_files = shard_format.shard_files(shard_dir, "train", shard_format.IMAGES)
    parsed = [row for path in image_files for row in _read(path, shard_format.parse_image_example)]
    assert [row[shard_format.IMAGE_INDEX] for row in parsed] == list(range(5))
    for row, record in zip(parsed, records):
        with open(record.path, "rb") as image_file:
            assert row[shard_format.IMAGE_ENCODED] == image_file.read()
        assert row[shard_format.IMAGE_SOURCE_ID].decode() == record.image_id
        assert row[shard_format.IMAGE_FILENAME].decode() == os.path.basename(record.path)
        assert (row[shard_format.IMAGE_HEIGHT], row[shard_format.IMAGE_WIDTH]) == (16, 24)
        assert row[shard_format.IMAGE_LABEL] == 100 + row[shard_format.IMAGE_INDEX]
    caption_files = shard_format.shard_files(shard_dir, "train", shard_format.CAPTIONS)
    captions = [row for path in caption_files for row in _read(path, shard_format.parse_caption_example)]
    for row, entry in zip(captions, _caption_entries(7), strict=True):
        assert tuple(row[shard_format.CAPTION_TOKEN_IDS]) == entry.token_ids
        assert row[shard_format.CAPTION_TEXT].decode() == entry.text
        assert row[shard_format.CAPTION_ID] == entry.caption_id
        assert row[shard_format.IMAGE_INDEX] == entry.image_index
        assert row[shard_format.IMAGE_LABEL] == entry.label
    for info, task in zip(infos, tasks, strict=True):
        assert info.file == os.path.basename(task.path) and info.written
        assert info.records == len(task.entries)
        with open(task.path, "rb") as shard_file:
            assert info.sha256 == hashlib.sha256(shard_file.read()).hexdigest()
    assert not [name for name in os.listdir(shard_dir) if name.endswith(shard_writer.TMP_SUFFIX)]


def test_rerun_keeps_complete_shards_and_replaces_a_leftover_temp_file(tmp_path):
    records = _records(tmp_path, 5)
    shard_dir, tasks, first = _write_all(tmp_path, records)
    mtimes = {task.path: os.stat(task.path).st_mtime_ns for task in tasks}
    interrupted = tasks[1].path
    os.remove(interrupted)
    with open(interrupted + shard_writer.TMP_SUFFIX, "wb") as leftover:
        leftover.write(b"half a shard")
    stale = os.path.join(shard_dir, shard_format.shard_name("train", shard_format.IMAGES, 0, 3))
    with open(stale, "wb") as stale_file:
        stale_file.write(b"from a build with 3 shards")

    _, _, second = _write_all(tmp_path, records)
    assert [info.written for info in second] == [task.path == interrupted for task in tasks]
    assert second == [
        shard_writer.ShardInfo(info.file, info.records, info.sha256, info.file == os.path.basename(interrupted))
        for info in first
    ]
    for task in tasks:
        if task.path != interrupted:
            assert os.stat(task.path).st_mtime_ns == mtimes[task.path]
    assert not os.path.exists(interrupted + shard_writer.TMP_SUFFIX)
    assert not os.path.exists(stale)


def test_a_shard_whose_content_changed_is_rewritten(tmp_path):
    records = _records(tmp_path, 4)
    _, tasks, first = _write_all(tmp_path, records)
    _jpeg_file(tmp_path / "img3.jpg", 250, height=20)
    _, _, second = _write_all(tmp_path, records)
    assert [info.written for info in second] == [False, True, False, False]
    assert second[1].sha256 != first[1].sha256


def test_two_worker_processes_write_the_same_records(tmp_path):
    records = _records(tmp_path, 6)
    one_dir, tasks, in_process = _write_all(tmp_path / "one", records, num_workers=1)
    two_dir, _, two_workers = _write_all(tmp_path / "two", records, num_workers=2)
    assert [(i.file, i.records) for i in two_workers] == [(i.file, i.records) for i in in_process]
    for info, task in zip(in_process, tasks):
        parse = (
            shard_format.parse_image_example
            if shard_format.IMAGES in info.file
            else shard_format.parse_caption_example
        )
        one, two = (_read(os.path.join(d, info.file), parse) for d in (one_dir, two_dir))
        assert len(one) == len(two) == len(task.entries)
        for row_one, row_two in zip(one, two):
            assert row_one.keys() == row_two.keys()
            for key in row_one:
                np.testing.assert_array_equal(row_one[key], row_two[key])
