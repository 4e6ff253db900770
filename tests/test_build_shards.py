"""build_shards end to end: skips, conversions, labels, strict mode, reruns, the CLI."""
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_prep import shared_data
from data_prep import build_shards, images, shard_writer
from data_prep.records import DataFormatError, ImageRecord, Skipped, SourceDataset
from dual_path import shard_format, text

REPO_ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = shared_data.FLICKR8K_RAW
DIM = 8


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)


def _jpeg(path: Path, seed: int) -> str:
    path.write_bytes(tf.io.encode_jpeg(_pixels(seed)).numpy())
    return str(path)


def _cmyk_jpeg(path: Path) -> str:
    pil_image = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    pil_image.fromarray(_pixels(9)).convert("CMYK").save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())
    return str(path)


@pytest.fixture
def source(tmp_path) -> SourceDataset:
    """6 good train images (3 to convert), 3 bad ones, 2 val images; one reader skip."""
    root = tmp_path / "images"
    root.mkdir()
    truncated = tf.io.encode_jpeg(_pixels(7)).numpy()
    (root / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (root / "text.jpg").write_text("this is not a picture\n")
    (root / "png.jpg").write_bytes(tf.io.encode_png(_pixels(8)).numpy())
    (root / "gray.jpg").write_bytes(tf.io.encode_jpeg(_pixels(10)[:, :, :1]).numpy())
    train = [
        ImageRecord("a", _jpeg(root / "a.jpg", 1), "train", ["A dog runs.", "A brown dog!"]),
        ImageRecord("truncated", str(root / "truncated.jpg"), "train", ["a cat"]),
        ImageRecord("b", _jpeg(root / "b.jpg", 2), "train", ["Two cats sleep", "a cat"]),
        ImageRecord("text", str(root / "text.jpg"), "train", ["a dog"]),
        ImageRecord("png", str(root / "png.jpg"), "train", ["a red ball"]),
        ImageRecord("missing", str(root / "missing.jpg"), "train", ["a dog"]),
        ImageRecord("gray", str(root / "gray.jpg"), "train", ["a gray dog"]),
        ImageRecord("cmyk", _cmyk_jpeg(root / "cmyk.jpg"), "train", ["a cyan cat"]),
        ImageRecord("c", _jpeg(root / "c.jpg", 3), "train", ["the dog"]),
    ]
    val = [
        ImageRecord("v0", _jpeg(root / "v0.jpg", 4), "val", ["a dog and a zebra", "zebra okapi"]),
        ImageRecord("v1", _jpeg(root / "v1.jpg", 5), "val", ["a cat"]),
    ]
    skipped = [Skipped("captions.json:7", "empty caption")]
    return SourceDataset("tiny", train + val, skipped, max_length=3)


def _build(source, shard_dir, **overrides) -> dict:
    settings = dict(num_image_shards=2, num_caption_shards=2, num_workers=1, embedding_dim=DIM)
    return build_shards.build_shards(source, str(shard_dir), **{**settings, **overrides})


def _rows(shard_dir, split, kind) -> list[dict]:
    parse = shard_format.parse_image_example if kind == shard_format.IMAGES else shard_format.parse_caption_example
    return [
        {key: value.numpy() for key, value in parse(serialized).items()}
        for path in shard_format.shard_files(str(shard_dir), split, kind)
        for serialized in tf.data.TFRecordDataset(path)
    ]


def test_bad_images_are_skipped_and_the_rest_converted(source, tmp_path):
    manifest = _build(source, tmp_path / "shards", source_format="test", source_files=["x.json"])
    assert manifest["skipped"]["counts"] == {
        "empty caption": 1,
        images.REASON_TRUNCATED_JPEG: 1,
        images.REASON_TEXT: 1,
        images.REASON_MISSING: 1,
        build_shards.REASON_NO_KNOWN_WORDS: 1,
    }
    items = {(item["stage"], item["item"], item["reason"]) for item in manifest["skipped"]["items"]}
    root = tmp_path / "images"
    assert ("image", str(root / "text.jpg"), images.REASON_TEXT) in items
    assert ("reader", "captions.json:7", "empty caption") in items
    assert ("caption", f"{root / 'v0.jpg'} caption 1", build_shards.REASON_NO_KNOWN_WORDS) in items
    assert manifest["converted"] == {"png": 1, "grayscale": 1, "cmyk": 1}
    assert manifest["splits"]["train"] == {"images": 6, "captions": 8, "skipped_images": 3, "skipped_captions": 0}
    assert manifest["splits"]["val"] == {"images": 2, "captions": 2, "skipped_images": 0, "skipped_captions": 1}
    assert manifest["splits"]["test"]["images"] == 0
    assert manifest["source"] == {"format": "test", "files": ["x.json"], "dataset_name": "tiny"}
    train_images = _rows(tmp_path / "shards", "train", shard_format.IMAGES)
    assert [row[shard_format.IMAGE_SOURCE_ID].decode() for row in train_images] == [
        "a", "b", "png", "gray", "cmyk", "c"
    ]
    for row in train_images:
        decoded = tf.io.decode_jpeg(row[shard_format.IMAGE_ENCODED], channels=3)
        assert decoded.shape == (12, 20, 3)
        assert tf.io.extract_jpeg_shape(row[shard_format.IMAGE_ENCODED]).numpy()[2] == 3


def test_round_trip_matches_the_manifest_and_the_inputs(source, tmp_path):
    shard_dir = tmp_path / "shards"
    manifest = _build(source, shard_dir)
    vocabulary = text.Vocabulary.load(text.vocabulary_path(str(shard_dir)))
    assert vocabulary.word_to_id("zebra") is None  # val words stay out of the vocabulary
    assert manifest["vocab_size"] == vocabulary.size
    assert (manifest["max_length"], manifest["oov"], manifest["num_classes"]) == (3, "drop", 6)
    init = np.load(text.word2vec_init_path(str(shard_dir)))
    assert init.shape == (vocabulary.size, DIM) and init.dtype == np.float32
    assert manifest["embedding"]["dim"] == DIM and manifest["embedding"]["coverage"]["word_fraction"] == 1.0

    kept = {record.image_id: record for record in source.records}
    for split in ("train", "val"):
        image_rows = _rows(shard_dir, split, shard_format.IMAGES)
        caption_rows = _rows(shard_dir, split, shard_format.CAPTIONS)
        assert len(image_rows) == manifest["splits"][split]["images"]
        assert len(caption_rows) == manifest["splits"][split]["captions"]
        assert [row[shard_format.IMAGE_INDEX] for row in image_rows] == list(range(len(image_rows)))
        assert [row[shard_format.IMAGE_LABEL] for row in image_rows] == list(range(len(image_rows)))
        for row in image_rows:
            record = kept[row[shard_format.IMAGE_SOURCE_ID].decode()]
            if record.image_id in ("a", "b", "c", "v0", "v1"):
                assert row[shard_format.IMAGE_ENCODED] == Path(record.path).read_bytes()
        image_ids = [row[shard_format.IMAGE_SOURCE_ID].decode() for row in image_rows]
        assert [row[shard_format.CAPTION_ID] for row in caption_rows] == list(range(len(caption_rows)))
        for row in caption_rows:
            caption = row[shard_format.CAPTION_TEXT].decode()
            image_index = row[shard_format.IMAGE_INDEX]
            assert caption in kept[image_ids[image_index]].captions
            assert row[shard_format.IMAGE_LABEL] == image_index
            expected = vocabulary.encode(text.tokenize(caption), max_length=3, oov="drop")
            assert row[shard_format.CAPTION_TOKEN_IDS].tolist() == expected
    for shard in manifest["shards"]:
        path = shard_dir / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == shard["records"]
    on_disk = sorted(name for name in os.listdir(shard_dir) if name.endswith(shard_format.SHARD_SUFFIX))
    assert on_disk == sorted(shard["file"] for shard in manifest["shards"])
    assert json.loads((shard_dir / shard_format.MANIFEST_NAME).read_text()) == manifest


def test_unk_mode_keeps_captions_with_unknown_words(source, tmp_path):
    manifest = _build(source, tmp_path / "shards", oov="unk")
    assert manifest["splits"]["val"]["captions"] == 3
    rows = _rows(tmp_path / "shards", "val", shard_format.CAPTIONS)
    assert rows[1][shard_format.CAPTION_TOKEN_IDS].tolist() == [text.UNK_ID, text.UNK_ID]


def test_strict_stops_before_anything_is_written(source, tmp_path):
    shard_dir = tmp_path / "shards"
    source.skipped = []
    with pytest.raises(DataFormatError, match="truncated.jpg: truncated JPEG$"):
        _build(source, shard_dir, strict=True)
    written = [name for name in os.listdir(shard_dir) if name != shard_writer.CACHE_DIR_NAME]
    assert written == []


def test_strict_stops_on_a_reader_skip_and_an_empty_caption(source, tmp_path):
    with pytest.raises(DataFormatError, match="^captions.json:7: empty caption$"):
        _build(source, tmp_path / "shards", strict=True)
    good = [record for record in source.records if record.image_id in ("a", "b", "v0")]
    with pytest.raises(DataFormatError, match=r"v0.jpg caption 1: no word of the caption is in"):
        _build(SourceDataset("tiny", good), tmp_path / "shards2", strict=True)


def test_person_ids_become_dense_sorted_classes(tmp_path):
    paths = [_jpeg(tmp_path / f"p{i}.jpg", i) for i in range(7)]
    records = [
        ImageRecord("p0", paths[0], "train", ["a man in red"], label="10"),
        ImageRecord("p1", paths[1], "train", ["a man in red"], label="2"),
        ImageRecord("p2", paths[2], "train", ["a woman"], label="7"),
        ImageRecord("p3", paths[3], "train", ["a man"], label="2"),
        ImageRecord("p4", paths[4], "test", ["a woman"], label="11"),
        ImageRecord("p5", paths[5], "test", ["a man"], label="11"),
        ImageRecord("p6", paths[6], "test", ["a man"], label="3"),
    ]
    manifest = _build(SourceDataset("cuhk", records, max_length=56), tmp_path / "shards")
    assert manifest["num_classes"] == 3
    train = _rows(tmp_path / "shards", "train", shard_format.IMAGES)
    assert [row[shard_format.IMAGE_LABEL] for row in train] == [2, 0, 1, 0]
    captions = _rows(tmp_path / "shards", "train", shard_format.CAPTIONS)
    assert [row[shard_format.IMAGE_LABEL] for row in captions] == [2, 0, 1, 0]
    # Evaluation splits keep person ids too (person search matches any image of the person).
    test = _rows(tmp_path / "shards", "test", shard_format.IMAGES)
    assert [row[shard_format.IMAGE_LABEL] for row in test] == [1, 1, 0]
    test_captions = _rows(tmp_path / "shards", "test", shard_format.CAPTIONS)
    assert [row[shard_format.IMAGE_LABEL] for row in test_captions] == [1, 1, 0]
    records[0].label = None
    with pytest.raises(DataFormatError, match="p0.jpg: no person id"):
        build_shards.instance_labels(records[:4], "train")


def test_rerun_keeps_shards_and_skips_the_image_checks(source, tmp_path, monkeypatch):
    shard_dir = tmp_path / "shards"
    first = _build(source, shard_dir, command_line="first")
    mtimes = {shard["file"]: (shard_dir / shard["file"]).stat().st_mtime_ns for shard in first["shards"]}
    interrupted = shard_dir / first["shards"][1]["file"]
    interrupted.unlink()
    Path(f"{interrupted}{shard_writer.TMP_SUFFIX}").write_bytes(b"partial")

    def must_not_decode(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(images, "check_image", must_not_decode)
    second = _build(source, shard_dir, command_line="second")
    assert second["shards"] == first["shards"]
    assert {**second, "command": "first"} == first
    for name, mtime in mtimes.items():
        if name != interrupted.name:
            assert (shard_dir / name).stat().st_mtime_ns == mtime
    assert not Path(f"{interrupted}{shard_writer.TMP_SUFFIX}").exists()


def test_pretrained_word2vec_file(source, tmp_path):
    vectors = tmp_path / "vectors.txt"
    rows = [f"{word} " + " ".join(["0.5"] * DIM) for word in ("dog", "Cat", "sky")]
    vectors.write_text(f"{len(rows)} {DIM}\n" + "\n".join(rows) + "\n")
    manifest = _build(source, tmp_path / "shards", word2vec_source=str(vectors))
    assert manifest["embedding"]["word2vec"] == str(vectors)
    assert manifest["embedding"]["coverage"]["found_words"] == 2
    with pytest.raises(DataFormatError, match=f"{vectors}: vectors have dim {DIM}, --embedding_dim is 4"):
        _build(source, tmp_path / "shards2", word2vec_source=str(vectors), embedding_dim=4)


def test_glove_file_sets_the_dim_and_the_manifest_reports_both_coverages(source, tmp_path):
    glove = tmp_path / "glove.6d.txt"  # GloVe's own format: lower-case words, no header line
    glove.write_text("".join(f"{word} " + " ".join([str(0.1 * index)] * 6) + "\n"
                             for index, word in enumerate(("dog", "cat", "the", "sky"), start=1)))
    shard_dir = tmp_path / "shards"
    manifest = _build(source, shard_dir, word2vec_source=str(glove), embedding_dim=None)
    embedding = manifest["embedding"]
    assert (embedding["dim"], embedding["format"], embedding["word2vec"]) == (6, "glove", str(glove))
    assert np.load(text.word2vec_init_path(str(shard_dir))).shape == (manifest["vocab_size"], 6)
    vocabulary = text.Vocabulary.load(text.vocabulary_path(str(shard_dir)))
    found = [word for word in vocabulary.words if word in ("dog", "cat", "the")]
    assert embedding["coverage"]["found_words"] == len(found) == embedding["coverage"]["as_is"]["found_words"]
    assert 0 < embedding["coverage"]["as_is"]["token_fraction"] == embedding["coverage"]["token_fraction"] < 1


@pytest.mark.subprocess
def test_an_embedding_dim_that_contradicts_the_file_stops_before_any_shard(source, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 0.1 0.2 0.3\ncat 0.4 0.5 0.6\n")
    shard_dir = tmp_path / "shards"
    result = _cli("--source_format=jsonl", f"--captions={_jsonl_captions(tmp_path)}",
                  f"--shard_dir={shard_dir}", f"--word2vec={glove}", "--embedding_dim=300")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"dual-path-build-shards: error: {glove}: vectors have dim 3, --embedding_dim is 300 "
        "(leave it unset to take the file's)")
    assert not shard_dir.exists()


def _jsonl_captions(tmp_path) -> Path:
    root = tmp_path / "jsonl_images"
    root.mkdir()
    _jpeg(root / "a.jpg", 1)
    captions = root / "captions.jsonl"
    captions.write_text('{"image": "a.jpg", "caption": "a dog", "split": "train"}\n')
    return captions


@pytest.mark.subprocess
def test_shared_glove_vectors_initialise_flickr8k_words(tmp_path):
    glove = shared_data.GLOVE_50D
    if not FLICKR8K.is_dir() or not glove.is_file():
        pytest.skip("../shared's Flickr8k or GloVe vectors are absent")
    text_dir = FLICKR8K / "Flickr8k_text"
    train_list = tmp_path / "train.txt"
    train_list.write_text("\n".join((text_dir / "Flickr_8k.trainImages.txt").read_text().splitlines()[:20]) + "\n")
    shard_dir = tmp_path / "shards"
    result = _cli("--source_format=flickr_tokens", f"--captions={text_dir / 'Flickr8k.token.txt'}",
                  f"--image_root={FLICKR8K / 'Flicker8k_Dataset'}", f"--split_files=train={train_list}",
                  f"--shard_dir={shard_dir}", f"--word2vec={glove}", "--num_workers=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "word vectors: 50-d from" in result.stdout
    manifest = json.loads((shard_dir / shard_format.MANIFEST_NAME).read_text())
    assert (manifest["embedding"]["dim"], manifest["embedding"]["format"]) == (50, "glove")
    assert manifest["embedding"]["coverage"]["token_fraction"] > 0.95
    vocabulary = text.Vocabulary.load(text.vocabulary_path(str(shard_dir)))
    init = np.load(text.word2vec_init_path(str(shard_dir)))
    dog_line = next(line for line in glove.read_text(encoding="utf-8").splitlines() if line.startswith("dog "))
    np.testing.assert_allclose(init[vocabulary.word_to_id("dog")], [float(v) for v in dog_line.split()[1:]],
                               rtol=1e-6)


def _cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.build_shards", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.subprocess
def test_cli_prints_a_reader_error_as_one_line(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image": "a.jpg", "caption": "a dog"}\n{"image": "b.jpg", \n')
    result = _cli("--source_format=jsonl", f"--captions={captions}", f"--shard_dir={tmp_path / 'out'}")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"dual-path-build-shards: error: {captions}:2: not valid JSON")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_flickr8k_subset_through_the_cli(tmp_path):
    if not FLICKR8K.is_dir():
        pytest.skip(f"{FLICKR8K} is absent")
    text_dir = FLICKR8K / "Flickr8k_text"
    split_lists = {}
    for split, name, count in (("train", "trainImages", 40), ("dev", "devImages", 10)):
        lines = (text_dir / f"Flickr_8k.{name}.txt").read_text().splitlines()[:count]
        split_lists[split] = tmp_path / f"{split}.txt"
        split_lists[split].write_text("\n".join(lines) + "\n")
    shard_dir = tmp_path / "shards"
    result = _cli(
        "--source_format=flickr_tokens",
        f"--captions={text_dir / 'Flickr8k.token.txt'}",
        f"--image_root={FLICKR8K / 'Flicker8k_Dataset'}",
        f"--split_files=train={split_lists['train']},dev={split_lists['dev']}",
        f"--shard_dir={shard_dir}",
        "--num_workers=2", "--num_image_shards=4", "--embedding_dim=16", "--min_word_count=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: 40 images, 200 captions" in result.stdout
    manifest = json.loads((shard_dir / shard_format.MANIFEST_NAME).read_text())
    assert manifest["splits"]["val"]["images"] == 10 and manifest["num_classes"] == 40
    assert manifest["source"]["format"] == "flickr_tokens"
    assert "--min_word_count=2" in manifest["command"]
    val_images = _rows(shard_dir, "val", shard_format.IMAGES)
    first_val = split_lists["dev"].read_text().splitlines()[0]
    assert val_images[0][shard_format.IMAGE_FILENAME].decode() == first_val
    assert val_images[0][shard_format.IMAGE_ENCODED] == (FLICKR8K / "Flicker8k_Dataset" / first_val).read_bytes()
    assert len(_rows(shard_dir, "val", shard_format.CAPTIONS)) == manifest["splits"]["val"]["captions"]


def test_an_image_left_without_captions_is_skipped(source, tmp_path):
    """An image whose every caption encodes to nothing is left out, so that the image
    indices of the split stay those of images that have captions (the pipeline needs it)."""
    root = tmp_path / "images"
    middle = ImageRecord("v2", _jpeg(root / "v2.jpg", 6), "val", ["okapi !"])
    records = source.records[:-1] + [middle, source.records[-1]]
    shard_dir = tmp_path / "shards"
    manifest = _build(SourceDataset("tiny", records, source.skipped, max_length=3), shard_dir)
    items = {(item["stage"], item["item"], item["reason"]) for item in manifest["skipped"]["items"]}
    assert ("image", str(root / "v2.jpg"), build_shards.REASON_NO_CAPTION_LEFT) in items
    assert manifest["splits"]["val"]["images"] == 2
    val_images = _rows(shard_dir, "val", shard_format.IMAGES)
    assert [row[shard_format.IMAGE_SOURCE_ID] for row in val_images] == [b"v0", b"v1"]
    val_captions = _rows(shard_dir, "val", shard_format.CAPTIONS)
    assert [row[shard_format.IMAGE_INDEX] for row in val_captions] == [0, 1]
    assert [row[shard_format.CAPTION_ID] for row in val_captions] == [0, 1]


def test_a_rebuild_removes_the_old_manifest_first(source, tmp_path, monkeypatch):
    shard_dir = tmp_path / "shards"
    _build(source, shard_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_writer, "write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(source, shard_dir, min_word_count=2)
    assert not (shard_dir / shard_format.MANIFEST_NAME).exists()


def test_an_image_replaced_in_place_rewrites_its_shard(source, tmp_path):
    shard_dir = tmp_path / "shards"
    _build(source, shard_dir)
    replaced = Path(source.records[0].path)
    old_bytes = replaced.read_bytes()
    new_bytes = tf.io.encode_jpeg(_pixels(99)).numpy()
    assert new_bytes != old_bytes
    replaced.write_bytes(new_bytes)
    _build(source, shard_dir)
    written = {row[shard_format.IMAGE_SOURCE_ID]: row[shard_format.IMAGE_ENCODED]
               for row in _rows(shard_dir, "train", shard_format.IMAGES)}
    assert written[b"a"] == new_bytes
