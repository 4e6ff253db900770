"""Readers: each dataset format, written here in its real layout, read into a SourceDataset."""
import csv
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from data_prep import shared_data
from data_prep import readers
from data_prep.readers import read_source
from data_prep.records import CUHK_PEDES_MAX_LENGTH, DEFAULT_MAX_LENGTH, DataFormatError

SHARED_FLICKR8K = shared_data.FLICKR8K_RAW
BAD_UTF8 = b"A dog \xff\xfe runs ."


def write_jpeg(path: Path, color=(200, 120, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path, format="JPEG")
    return path


def jpeg_bytes(color=(10, 200, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_json_with_bad_bytes(path: Path, content, placeholder: str, raw: bytes) -> Path:
    """Writes content as JSON, then puts raw (non-UTF-8) bytes where placeholder was."""
    path.write_bytes(json.dumps(content).encode("utf-8").replace(placeholder.encode(), raw))
    return path


def skips(dataset) -> list[tuple[str, str]]:
    return [(skipped.item, skipped.reason) for skipped in dataset.skipped]


def by_id(dataset) -> dict:
    return {record.image_id: record for record in dataset.records}


# --- Karpathy split JSON -------------------------------------------------------------


def karpathy_image(filename, split, raws, filepath=None, cocoid=None, imgid=0):
    image = {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentids": list(range(len(raws))),
        "sentences": [
            {"raw": raw, "tokens": raw.lower().split(), "imgid": imgid, "sentid": n} for n, raw in enumerate(raws)
        ],
    }
    if filepath is not None:
        image["filepath"] = filepath
    if cocoid is not None:
        image["cocoid"] = cocoid
    return image


def test_karpathy_coco_paths_ids_splits_and_restval(tmp_path):
    images = [
        karpathy_image(
            "COCO_val2014_000000391895.jpg", "test", ["A man riding a bike.", "Bike ride. "], "val2014", 391895
        ),
        karpathy_image("COCO_val2014_000000522418.jpg", "restval", ["A woman cutting a cake."], "val2014", 522418, 1),
        karpathy_image("COCO_train2014_000000318556.jpg", "train", ["A kitchen."], "train2014", 318556, 2),
        karpathy_image("COCO_val2014_000000184613.jpg", "val", ["A child holding an umbrella."], "val2014", 184613, 3),
    ]
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_text(json.dumps({"images": images, "dataset": "coco"}))

    dataset = read_source("karpathy", captions=str(json_path), image_root=str(tmp_path / "coco"))

    assert dataset.name == "coco" and dataset.max_length == DEFAULT_MAX_LENGTH and not dataset.skipped
    records = by_id(dataset)
    assert list(records) == ["391895", "522418", "318556", "184613"]
    test_record = records["391895"]
    assert test_record.path == str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg")
    assert test_record.split == "test" and test_record.captions == ["A man riding a bike.", "Bike ride."]
    assert test_record.label is None
    assert records["522418"].split == "train" and records["184613"].split == "val"

    restval_to_val = read_source("karpathy", captions=str(json_path), restval_split="val")
    assert by_id(restval_to_val)["522418"].split == "val"
    assert by_id(restval_to_val)["522418"].path.startswith(str(tmp_path) + os.sep)


def test_karpathy_flickr_style_uses_file_name_as_id_and_json_folder_as_root(tmp_path):
    write_jpeg(tmp_path / "1000268201_693b08cb0e.jpg")
    images = [karpathy_image("1000268201_693b08cb0e.jpg", "train", ["A child in a pink dress ."])]
    json_path = tmp_path / "dataset_flickr8k.json"
    json_path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))

    (record,) = read_source("karpathy", captions=str(json_path)).records

    assert record.image_id == "1000268201_693b08cb0e.jpg"
    assert Path(record.path) == tmp_path / "1000268201_693b08cb0e.jpg" and Path(record.path).is_file()


def test_karpathy_skips_bad_entries_and_strict_raises(tmp_path):
    images = [
        karpathy_image("a.jpg", "train", ["  ", "A dog runs ."], "images", imgid=0),
        karpathy_image("blank.jpg", "train", ["", " \t "], "images", imgid=1),
        karpathy_image("a.jpg", "val", ["Same image again ."], "images", imgid=2),
        karpathy_image("escape.jpg", "train", ["Outside ."], "../../etc", imgid=3),
        karpathy_image("/etc/passwd", "train", ["Absolute ."], imgid=4),
        karpathy_image("bytes.jpg", "test", ["BADCAPTION"], "images", imgid=5),
        karpathy_image("odd.jpg", "holdout", ["Unknown split ."], "images", imgid=6),
    ]
    json_path = write_json_with_bad_bytes(
        tmp_path / "dataset_synthetic.json", {"images": images, "dataset": "synthetic"}, "BADCAPTION", BAD_UTF8
    )

    dataset = read_source("karpathy", captions=str(json_path))

    assert [(record.image_id, record.captions) for record in dataset.records] == [("a.jpg", ["A dog runs ."])]
    assert skips(dataset) == [
        (f"{json_path}: images[0] caption 0", readers.EMPTY_CAPTION),
        (f"{json_path}: images[1] caption 0", readers.EMPTY_CAPTION),
        (f"{json_path}: images[1] caption 1", readers.EMPTY_CAPTION),
        (f"{json_path}: images[1] (image id 'blank.jpg')", readers.NO_USABLE_CAPTION),
        (f"{json_path}: images[2] (image id 'a.jpg')", readers.DUPLICATE_IMAGE_ID),
        (f"{json_path}: images[3] (../../etc/escape.jpg)", readers.OUTSIDE_IMAGE_ROOT),
        (f"{json_path}: images[4] (/etc/passwd)", readers.OUTSIDE_IMAGE_ROOT),
        (f"{json_path}: images[5] caption 0", readers.NOT_UTF8),
        (f"{json_path}: images[5] (image id 'bytes.jpg')", readers.NO_USABLE_CAPTION),
        (f"{json_path}: images[6] ('holdout')", readers.UNKNOWN_SPLIT),
    ]
    with pytest.raises(DataFormatError, match=r"dataset_synthetic\.json: images\[0\] caption 0: empty caption"):
        read_source("karpathy", captions=str(json_path), strict=True)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[]", r"expected a JSON object at the top level, got list"),
        (b'{"dataset": "coco"}', r"missing key 'images'"),
        (b'{"images": [{"filename": "a.jpg", "split": "train"}]}', r"images\[0\]: missing key 'sentences'"),
        (b'{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": []}]}]}',
         r"images\[0\] sentences\[0\]: missing key 'raw'"),
        (b'{"images": [{"filename": 7, "split": "train", "sentences": []}]}', r"'filename' should be a string"),
        (b'{"images": [', r"not valid JSON"),
    ],
)
def test_karpathy_wrong_format_raises_naming_file(tmp_path, content, message):
    json_path = tmp_path / "dataset_flickr30k.json"
    json_path.write_bytes(content)
    with pytest.raises(DataFormatError, match=r"dataset_flickr30k\.json.*" + message):
        read_source("karpathy", captions=str(json_path))


# --- Flickr token files ----------------------------------------------------------------


def write_flickr(tmp_path: Path, token_lines: list[bytes], splits: dict[str, list[str]]):
    text_dir = tmp_path / "Flickr8k_text"
    text_dir.mkdir()
    token_path = text_dir / "Flickr8k.token.txt"
    token_path.write_bytes(b"\n".join(token_lines) + b"\n")
    split_paths = {}
    for split, names in splits.items():
        split_paths[split] = text_dir / f"Flickr_8k.{split}Images.txt"
        split_paths[split].write_text("".join(name + "\n" for name in names))
    return token_path, split_paths


def test_flickr_tokens_reads_listed_images_with_dev_as_val(tmp_path):
    for name in ("1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"):
        write_jpeg(tmp_path / "Flicker8k_Dataset" / name)
    token_path, split_paths = write_flickr(
        tmp_path,
        [
            b"1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs .",
            b"1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .",
            b"1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting",
            b"1002674143_1b742ab4b8.jpg#0\tA little girl covered in paint sits in front of a rainbow .\r",
            b"2258277193_586949ec62.jpg.1#0\tAn image in no split list .",
        ],
        {"train": ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"], "dev": ["1002674143_1b742ab4b8.jpg"]},
    )

    dataset = read_source(
        "flickr_tokens",
        captions=str(token_path),
        split_files=f"train={split_paths['train']},dev={split_paths['dev']}",
        image_root=str(tmp_path / "Flicker8k_Dataset"),
        dataset_name="flickr8k",
    )

    assert dataset.name == "flickr8k" and not dataset.skipped
    assert [(record.image_id, record.split) for record in dataset.records] == [
        ("1000268201_693b08cb0e.jpg", "train"),
        ("1001773457_577c3a7d70.jpg", "train"),
        ("1002674143_1b742ab4b8.jpg", "val"),
    ]
    first = dataset.records[0]
    assert first.captions == [
        "A child in a pink dress is climbing up a set of stairs .",
        "A girl going into a wooden building .",
    ]
    assert dataset.records[2].captions == ["A little girl covered in paint sits in front of a rainbow ."]
    assert all(Path(record.path).is_file() for record in dataset.records)


def test_flickr_tokens_skips_bad_lines_and_strict_raises(tmp_path):
    token_path, split_paths = write_flickr(
        tmp_path,
        [
            b"a.jpg#0\tA dog runs .",
            b"a.jpg#0\tThe same caption id again .",
            b"a.jpg#1\t   ",
            b"b.jpg#0\t" + BAD_UTF8,
            b"c.jpg#0\tA cat sleeps .",
            b"../outside.jpg#0\tEscapes the image folder .",
        ],
        {"train": ["a.jpg", "b.jpg", "missing.jpg"], "test": ["c.jpg", "a.jpg", "../outside.jpg"]},
    )
    split_files = {"train": str(split_paths["train"]), "test": str(split_paths["test"])}

    dataset = read_source("flickr_tokens", captions=str(token_path), split_files=split_files, image_root=str(tmp_path))

    assert [(record.image_id, record.split, record.captions) for record in dataset.records] == [
        ("a.jpg", "train", ["A dog runs ."]),
        ("c.jpg", "test", ["A cat sleeps ."]),
    ]
    assert skips(dataset) == [
        (f"{token_path}:2 (a.jpg#0)", readers.DUPLICATE_CAPTION_ID),
        (f"{token_path}:3", readers.EMPTY_CAPTION),
        (f"{token_path}:4", readers.NOT_UTF8),
        (f"{split_paths['train']}:2 (b.jpg)", readers.LISTED_IMAGE_WITHOUT_CAPTIONS),
        (f"{split_paths['train']}:3 (missing.jpg)", readers.LISTED_IMAGE_WITHOUT_CAPTIONS),
        (f"{split_paths['test']}:2 (image id 'a.jpg')", readers.DUPLICATE_IMAGE_ID),
        (f"{split_paths['test']}:3 (../outside.jpg)", readers.OUTSIDE_IMAGE_ROOT),
    ]
    with pytest.raises(DataFormatError, match=r"Flickr8k\.token\.txt:2 \(a\.jpg#0\): duplicate caption id"):
        read_source("flickr_tokens", captions=str(token_path), split_files=split_files, strict=True)


def test_flickr_tokens_bad_files_raise_before_reading(tmp_path):
    token_path, split_paths = write_flickr(tmp_path, [b"a.jpg#0\tA dog ."], {"train": ["a.jpg"]})
    with pytest.raises(DataFormatError, match=r"nope\.txt: cannot read caption file"):
        read_source("flickr_tokens", captions=str(token_path), split_files=f"train={tmp_path / 'nope.txt'}")
    with pytest.raises(DataFormatError, match=r"nope\.token: cannot read caption file"):
        read_source("flickr_tokens", captions=str(tmp_path / "nope.token"), split_files=f"train={split_paths['train']}")
    token_path.write_bytes(b"a.jpg#0\tA dog .\na.jpg A caption without the tab\n")
    with pytest.raises(DataFormatError, match=r"token\.txt:2: expected 'IMAGE#N<TAB>caption'"):
        read_source("flickr_tokens", captions=str(token_path), split_files=f"train={split_paths['train']}")
    with pytest.raises(ValueError, match=r"unknown split 'holdout'"):
        read_source("flickr_tokens", captions=str(token_path), split_files=f"holdout={split_paths['train']}")


def test_flickr_tokens_on_shared_flickr8k():
    if not SHARED_FLICKR8K.is_dir():
        pytest.skip(f"{SHARED_FLICKR8K} is absent")
    text_dir = SHARED_FLICKR8K / "Flickr8k_text"
    dataset = read_source(
        "flickr_tokens",
        captions=str(text_dir / "Flickr8k.token.txt"),
        split_files={
            "train": str(text_dir / "Flickr_8k.trainImages.txt"),
            "dev": str(text_dir / "Flickr_8k.devImages.txt"),
        },
        image_root=str(SHARED_FLICKR8K / "Flicker8k_Dataset"),
        strict=True,
    )
    assert len(dataset.split("train")) == 6000 and len(dataset.split("val")) == 1000 and not dataset.split("test")
    assert all(len(record.captions) == 5 for record in dataset.records)
    assert len({record.image_id for record in dataset.records}) == 7000
    assert all(os.path.isfile(record.path) for record in dataset.records)


# --- MSCOCO caption annotations ----------------------------------------------------------


def write_coco(tmp_path: Path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    train = {
        "info": {"year": 2014},
        "images": [
            {"id": 318556, "file_name": "COCO_train2014_000000318556.jpg", "height": 480, "width": 640},
            {"id": 116100, "file_name": "COCO_train2014_000000116100.jpg", "height": 480, "width": 640},
        ],
        "annotations": [
            {"image_id": 318556, "id": 48, "caption": "A very clean and well decorated empty bathroom"},
            {"image_id": 116100, "id": 67, "caption": "A panoramic view of a kitchen ."},
            {"image_id": 318556, "id": 126, "caption": "A blue and white bathroom with butterfly themed wall tiles."},
        ],
    }
    val = {
        "images": [
            {"id": 391895, "file_name": "COCO_val2014_000000391895.jpg"},
            {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg"},
            {"id": 184613, "file_name": "COCO_val2014_000000184613.jpg"},
        ],
        "annotations": [
            {"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a small moped on a dirt road. "},
            {"image_id": 522418, "id": 681330, "caption": "A woman wearing a net on her head cutting a cake. "},
            {"image_id": 184613, "id": 3, "caption": "A child holding a flowered umbrella."},
        ],
    }
    train_path, val_path = annotations / "captions_train2014.json", annotations / "captions_val2014.json"
    train_path.write_text(json.dumps(train))
    val_path.write_text(json.dumps(val))
    return train_path, val_path


def test_coco_reads_split_file_with_two_image_roots(tmp_path):
    train_path, val_path = write_coco(tmp_path)
    split_path = tmp_path / "karpathy_split.txt"
    split_path.write_text(
        "train COCO_train2014_000000318556.jpg\n"
        "restval COCO_val2014_000000522418.jpg\n"
        "test COCO_val2014_000000391895.jpg\n"
        "\n"
        "val COCO_val2014_000000184613.jpg\n"
    )
    dataset = read_source(
        "coco",
        captions=f"{train_path},{val_path}",
        image_root=f"{tmp_path / 'train2014'},{tmp_path / 'val2014'}",
        split_files=str(split_path),
    )
    assert dataset.name == "coco" and not dataset.skipped
    assert [(record.image_id, record.split) for record in dataset.records] == [
        ("318556", "train"),
        ("522418", "train"),
        ("391895", "test"),
        ("184613", "val"),
    ]
    records = by_id(dataset)
    assert records["318556"].path == str(tmp_path / "train2014" / "COCO_train2014_000000318556.jpg")
    assert records["318556"].captions == [
        "A very clean and well decorated empty bathroom",
        "A blue and white bathroom with butterfly themed wall tiles.",
    ]
    assert records["391895"].path == str(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    assert records["391895"].captions == ["A man with a red helmet on a small moped on a dirt road."]
    assert "116100" not in records  # not in the split file: left out, not a skip


def test_coco_skips_bad_entries_and_strict_raises(tmp_path):
    content = {
        "images": [
            {"id": 1, "file_name": "one.jpg"},
            {"id": 1, "file_name": "one_again.jpg"},
            {"id": 2, "file_name": "../two.jpg"},
            {"id": 3, "file_name": "three.jpg"},
            {"id": 4, "file_name": "four.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A dog ."},
            {"image_id": 1, "id": 10, "caption": "Same caption id ."},
            {"image_id": 9, "id": 11, "caption": "Unknown image ."},
            {"image_id": 3, "id": 12, "caption": "BADCAPTION"},
            {"image_id": 4, "id": 13, "caption": " "},
        ],
    }
    captions_path = write_json_with_bad_bytes(tmp_path / "captions_val2014.json", content, "BADCAPTION", BAD_UTF8)
    split_path = tmp_path / "split.txt"
    split_path.write_bytes(
        b"test one.jpg\ntest three.jpg\nval four.jpg\nval nowhere.jpg\nholdout one.jpg\ntest \xff.jpg\n"
    )

    dataset = read_source("coco", captions=[str(captions_path)], split_files=str(split_path))

    assert [(record.image_id, record.captions) for record in dataset.records] == [("1", ["A dog ."])]
    assert skips(dataset) == [
        (f"{captions_path}: images[1] (image id '1')", readers.DUPLICATE_IMAGE_ID),
        (f"{captions_path}: images[2] (../two.jpg)", readers.OUTSIDE_IMAGE_ROOT),
        (f"{captions_path}: annotations[1] (caption id 10)", readers.DUPLICATE_CAPTION_ID),
        (f"{captions_path}: annotations[2] (image id 9)", readers.CAPTION_OF_UNKNOWN_IMAGE),
        (f"{captions_path}: annotations[3]", readers.NOT_UTF8),
        (f"{captions_path}: annotations[4]", readers.EMPTY_CAPTION),
        (f"{split_path}:2 (image id '3')", readers.NO_USABLE_CAPTION),
        (f"{split_path}:3 (image id '4')", readers.NO_USABLE_CAPTION),
        (f"{split_path}:4 (nowhere.jpg)", readers.LISTED_IMAGE_WITHOUT_CAPTIONS),
        (f"{split_path}:5 ('holdout')", readers.UNKNOWN_SPLIT),
        (f"{split_path}:6", readers.NOT_UTF8),
    ]
    duplicate = r"captions_val2014\.json: images\[1\] \(image id '1'\): duplicate image id"
    with pytest.raises(DataFormatError, match=duplicate):
        read_source("coco", captions=str(captions_path), split_files=str(split_path), strict=True)


def test_coco_wrong_format_raises(tmp_path):
    train_path, val_path = write_coco(tmp_path)
    split_path = tmp_path / "split.txt"
    split_path.write_text("test COCO_val2014_000000391895.jpg extra\n")
    with pytest.raises(DataFormatError, match=r"split\.txt:1: expected '<split> <file_name>'"):
        read_source("coco", captions=str(val_path), split_files=str(split_path))
    val_path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataFormatError, match=r"captions_val2014\.json: missing key 'annotations'"):
        read_source("coco", captions=f"{train_path},{val_path}", split_files=str(split_path))
    val_path.write_text(json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": []}))
    with pytest.raises(DataFormatError, match=r"captions_val2014\.json: images\[0\]: missing key 'id'"):
        read_source("coco", captions=str(val_path), split_files=str(split_path))
    with pytest.raises(ValueError, match=r"2 caption files but 1 image roots"):
        read_source(
            "coco", captions=[str(train_path), str(val_path)], image_root=str(tmp_path), split_files=str(split_path)
        )


# --- CUHK-PEDES -------------------------------------------------------------------------


def test_cuhk_pedes_labels_are_person_ids(tmp_path):
    entries = [
        {"split": "train", "captions": ["A woman in a white shirt .", "She wears blue jeans ."],
         "file_path": "CUHK01/0363004.png", "processed_tokens": [["a", "woman"], ["she"]], "id": 1},
        {"split": "train", "captions": ["The same woman from behind ."],
         "file_path": "CUHK01/0363003.png", "processed_tokens": [["the"]], "id": 1},
        {"split": "test", "captions": ["A man carrying a black bag ."],
         "file_path": "test_query/p8848_s17661.jpg", "processed_tokens": [["a"]], "id": 12004},
        {"split": "val", "captions": [" "], "file_path": "CUHK03/1_1.png", "processed_tokens": [[]], "id": 11004},
        {"split": "train", "captions": ["Again ."], "file_path": "CUHK01/0363004.png",
         "processed_tokens": [[]], "id": 2},
        {"split": "train", "captions": ["Escapes ."], "file_path": "../CUHK01/x.png",
         "processed_tokens": [[]], "id": 3},
    ]
    json_path = tmp_path / "reid_raw.json"
    json_path.write_text(json.dumps(entries))
    image_root = tmp_path / "imgs"

    dataset = read_source("cuhk_pedes", captions=str(json_path), image_root=str(image_root))

    assert dataset.max_length == CUHK_PEDES_MAX_LENGTH == 56 and dataset.name == "cuhk_pedes"
    assert [(record.image_id, record.split, record.label) for record in dataset.records] == [
        ("CUHK01/0363004.png", "train", "1"),
        ("CUHK01/0363003.png", "train", "1"),
        ("test_query/p8848_s17661.jpg", "test", "12004"),
    ]
    assert dataset.records[0].path == str(image_root / "CUHK01" / "0363004.png")
    assert dataset.records[0].captions == ["A woman in a white shirt .", "She wears blue jeans ."]
    assert skips(dataset) == [
        (f"{json_path}: [3] caption 0", readers.EMPTY_CAPTION),
        (f"{json_path}: [3] (image id 'CUHK03/1_1.png')", readers.NO_USABLE_CAPTION),
        (f"{json_path}: [4] (image id 'CUHK01/0363004.png')", readers.DUPLICATE_IMAGE_ID),
        (f"{json_path}: [5] (../CUHK01/x.png)", readers.OUTSIDE_IMAGE_ROOT),
    ]
    with pytest.raises(DataFormatError, match=r"reid_raw\.json: \[3\] caption 0: empty caption"):
        read_source("cuhk_pedes", captions=str(json_path), image_root=str(image_root), strict=True)

    json_path.write_text(json.dumps({"annotations": entries}))
    with pytest.raises(DataFormatError, match=r"reid_raw\.json: expected a JSON list at the top level, got object"):
        read_source("cuhk_pedes", captions=str(json_path))
    json_path.write_text(json.dumps([{"split": "train", "captions": ["x"], "id": 1}]))
    with pytest.raises(DataFormatError, match=r"reid_raw\.json: \[0\]: missing key 'file_path'"):
        read_source("cuhk_pedes", captions=str(json_path))


# --- TFDS coco_captions ---------------------------------------------------------------------


def test_tfds_coco_writes_each_kept_image_once(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    examples = {
        "train": [(318556, jpeg_bytes((255, 0, 0)), [b"A clean bathroom .", b"Tiles on the wall ."])],
        "val": [(184613, jpeg_bytes((0, 255, 0)), [b"A child with an umbrella ."])],
        "test": [(391895, jpeg_bytes((0, 0, 255)), [b"A man on a moped .", BAD_UTF8]),
                 (700, jpeg_bytes(), [b" ", b""])],
        "restval": [(522418, jpeg_bytes((9, 9, 9)), [b"A woman cutting a cake ."]),
                    (318556, jpeg_bytes(), [b"Duplicate id ."])],
    }

    def fake_as_dataset(self, split, **kwargs):
        del self, kwargs
        rows = examples[split]
        return tf.data.Dataset.from_generator(
            lambda: (
                {"image": image, "image/id": coco_id, "captions": {"text": texts, "id": list(range(len(texts)))}}
                for coco_id, image, texts in rows
            ),
            output_signature={
                "image": tf.TensorSpec([], tf.string),
                "image/id": tf.TensorSpec([], tf.int64),
                "captions": {"text": tf.TensorSpec([None], tf.string), "id": tf.TensorSpec([None], tf.int64)},
            },
        )

    cache = tmp_path / "coco_images"
    cache.mkdir()
    (cache / "184613.jpg").write_bytes(b"written by an earlier run")
    with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset):
        dataset = read_source("tfds_coco", image_root=str(cache), tfds_data_dir=str(tmp_path / "tfds"))

    assert dataset.name == "coco_captions"
    assert [(record.image_id, record.split, record.captions) for record in dataset.records] == [
        ("318556", "train", ["A clean bathroom .", "Tiles on the wall ."]),
        ("184613", "val", ["A child with an umbrella ."]),
        ("391895", "test", ["A man on a moped ."]),
        ("522418", "train", ["A woman cutting a cake ."]),
    ]
    assert skips(dataset) == [
        ("tfds coco_captions/test: image 391895 caption 1", readers.NOT_UTF8),
        ("tfds coco_captions/test: image 700 caption 0", readers.EMPTY_CAPTION),
        ("tfds coco_captions/test: image 700 caption 1", readers.EMPTY_CAPTION),
        ("tfds coco_captions/test: image 700 (image id '700')", readers.NO_USABLE_CAPTION),
        ("tfds coco_captions/restval: image 318556 (image id '318556')", readers.DUPLICATE_IMAGE_ID),
    ]
    assert sorted(os.listdir(cache)) == ["184613.jpg", "318556.jpg", "391895.jpg", "522418.jpg"]
    assert (cache / "184613.jpg").read_bytes() == b"written by an earlier run"
    for record in dataset.records:
        assert record.path == str(cache / f"{record.image_id}.jpg")
    assert (cache / "318556.jpg").read_bytes() == examples["train"][0][1]
    decoded = tf.io.decode_jpeg((cache / "391895.jpg").read_bytes())
    assert decoded.shape == (12, 16, 3) and int(decoded[6, 8, 2]) > 200

    with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset):
        with pytest.raises(DataFormatError, match=r"tfds coco_captions/test: image 391895 caption 1: not valid UTF-8"):
            read_source("tfds_coco", image_root=str(cache), strict=True)


def test_tfds_coco_unprepared_raises(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataFormatError, match=r"coco_captions is not prepared"):
        read_source("tfds_coco", image_root=str(tmp_path / "images"), tfds_data_dir=str(tmp_path / "empty"))
    assert not (tmp_path / "images").exists()


# --- CSV / JSONL ---------------------------------------------------------------------------


def test_csv_collects_captions_per_image(tmp_path):
    write_jpeg(tmp_path / "photos" / "beach.jpg")
    write_jpeg(tmp_path / "photos" / "park.jpg")
    absolute_image = write_jpeg(tmp_path / "elsewhere" / "city.jpg")
    csv_path = tmp_path / "captions.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as csv_file:
        writer = csv.writer(csv_file)
        writer.writerow(["image", "caption", "split"])
        writer.writerow(["photos/beach.jpg", "Two dogs run on the beach.", "train"])
        writer.writerow(["photos/park.jpg", 'A "quoted", comma caption\nover two lines.', ""])
        writer.writerow(["photos/beach.jpg", "Sand and sea.", "train"])
        writer.writerow([str(absolute_image), "Tall buildings.", "dev"])

    dataset = read_source("csv", captions=str(csv_path), default_split="test")

    assert dataset.name == "captions" and not dataset.skipped
    assert [(record.image_id, record.split, record.captions) for record in dataset.records] == [
        ("photos/beach.jpg", "train", ["Two dogs run on the beach.", "Sand and sea."]),
        ("photos/park.jpg", "test", ['A "quoted", comma caption\nover two lines.']),
        (str(absolute_image), "val", ["Tall buildings."]),
    ]
    assert all(Path(record.path).is_file() and os.path.isabs(record.path) for record in dataset.records)


def test_csv_skips_bad_rows_and_checks_header(tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_bytes(
        b"split,caption,image\n"
        b"train,A dog .,a.jpg\n"
        b"val,Same image in another split .,a.jpg\n"
        b"train,   ,b.jpg\n"
        b"train," + BAD_UTF8 + b",c.jpg\n"
        b"train,Escapes .,../d.jpg\n"
        b"holdout,Unknown split .,e.jpg\n"
    )
    dataset = read_source("csv", captions=str(csv_path), image_root=str(tmp_path / "images"))
    assert [(record.image_id, record.path, record.captions) for record in dataset.records] == [
        ("a.jpg", str(tmp_path / "images" / "a.jpg"), ["A dog ."])
    ]
    assert skips(dataset) == [
        (f"{csv_path}:5", readers.NOT_UTF8),  # all rows are decoded before any is used
        (f"{csv_path}:3 (a.jpg is in train)", readers.SPLIT_CONFLICT),
        (f"{csv_path}:4", readers.EMPTY_CAPTION),
        (f"{csv_path}:6 (../d.jpg)", readers.OUTSIDE_IMAGE_ROOT),
        (f"{csv_path}:7 ('holdout')", readers.UNKNOWN_SPLIT),
    ]
    with pytest.raises(DataFormatError, match=r"mine\.csv:5: not valid UTF-8"):
        read_source("csv", captions=str(csv_path), strict=True)

    csv_path.write_text("path,text\nimage.jpg,A dog .\n")
    bad_header = r"mine\.csv: header \['path', 'text'\] lacks column\(s\) \['image', 'caption'\]"
    with pytest.raises(DataFormatError, match=bad_header):
        read_source("csv", captions=str(csv_path))


def test_jsonl_reads_rows_and_rejects_wrong_format(tmp_path):
    jsonl_path = tmp_path / "own.jsonl"
    jsonl_path.write_bytes(
        b'{"image": "x/1.jpg", "caption": "A red car .", "split": "val"}\n'
        b'{"image": "x/2.jpg", "caption": "' + BAD_UTF8 + b'"}\n'
        b"\n"
        b'{"image": "x/1.jpg", "caption": "Parked on a street ."}\n'
        b'{"image": "x/3.jpg", "caption": "A boat ."}\n'
    )
    dataset = read_source("jsonl", captions=str(jsonl_path))
    assert [(record.image_id, record.split, record.captions) for record in dataset.records] == [
        ("x/1.jpg", "val", ["A red car ."]),
        ("x/3.jpg", "train", ["A boat ."]),
    ]
    assert skips(dataset) == [
        (f"{jsonl_path}:2", readers.NOT_UTF8),
        (f"{jsonl_path}:4 (x/1.jpg is in val)", readers.SPLIT_CONFLICT),
    ]
    jsonl_path.write_text('{"image": "x/1.jpg", "caption": "ok"}\n{"image": "x/2.jpg"}\n')
    with pytest.raises(DataFormatError, match=r"own\.jsonl:2: missing key 'caption'"):
        read_source("jsonl", captions=str(jsonl_path))
    jsonl_path.write_text('{"image": "x/1.jpg", "caption": "ok"}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"own\.jsonl:2: not valid JSON"):
        read_source("jsonl", captions=str(jsonl_path))


# --- read_source ------------------------------------------------------------------------------


@pytest.mark.parametrize("format_name", ["karpathy", "cuhk_pedes", "csv", "jsonl"])
def test_missing_caption_file_raises_naming_it(tmp_path, format_name):
    missing = tmp_path / "not_there.json"
    with pytest.raises(DataFormatError, match=r"not_there\.json: cannot read caption file"):
        read_source(format_name, captions=str(missing))


def test_read_source_checks_format_and_arguments(tmp_path):
    json_path = tmp_path / "dataset_flickr8k.json"
    json_path.write_text(json.dumps({"images": [karpathy_image("a.jpg", "train", ["A dog ."])], "dataset": "flickr8k"}))
    dataset = read_source("karpathy", captions=str(json_path), image_root="", split_files=None, strict=False)
    assert len(dataset.records) == 1
    with pytest.raises(ValueError, match=r"unknown source format 'parquet'"):
        read_source("parquet", captions=str(json_path))
    with pytest.raises(ValueError, match=r"'karpathy' does not take \['split_files'\]"):
        read_source("karpathy", captions=str(json_path), split_files="train=x.txt")
    with pytest.raises(ValueError, match=r"restval_split must be one of"):
        read_source("karpathy", captions=str(json_path), restval_split="restval")
    with pytest.raises(ValueError, match=r"'flickr_tokens' needs \['split_files'\]"):
        read_source("flickr_tokens", captions=str(json_path))
