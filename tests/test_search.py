"""Retrieval with an exported model: dual_path/search.py and the dual-path-search command.

A module fixture trains a small model on 64 synthetic training images for about 30 s
(instance loss and ranking loss, backbone trained from the start) so that it knows its
training images, exports it with dual_path.export, and the tests search those images:
a caption must find its own image far above chance, the index must skip a corrupt file
with a warning naming it, contact sheets and the word chart must be written, and the
colour words of a caption must weigh more than its articles.
"""
import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from dual_path import export, search, text, training
from dual_path.model import DualPathConfig

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
NUM_TRAIN = 64
EPOCHS = 120  # of 4 steps: about 30 s on a loaded 2-core CPU
CHANCE_AT_5 = 5 / NUM_TRAIN


class SearchSetup(NamedTuple):
    """raw_dir: the generated dataset (images/, dataset_synthetic.json); shard_dir: its
    shards; export_dir: the trained model's SavedModel; train_captions: {image file name:
    its 5 raw captions} of the training images."""

    raw_dir: Path
    shard_dir: str
    export_dir: str
    train_captions: dict[str, list[str]]


@pytest.fixture(scope="module")
def setup(synthetic_shards, tmp_path_factory) -> SearchSetup:
    data = synthetic_shards("search", num_train=NUM_TRAIN, num_val=8, image_size=IMAGE_SIZE)
    shard_dir, dataset_json, manifest = data.shard_dir, data.captions, data.manifest
    root = tmp_path_factory.mktemp("search")
    model = DualPathConfig(
        vocab_size=manifest["vocab_size"], num_classes=manifest["num_classes"],
        max_length=manifest["max_length"], backbone="small_cnn", weights=None,
        image_size=IMAGE_SIZE, small_cnn_widths=(16, 32), embedding_dim=16, text_blocks=(1, 1),
        text_widths=(32, 64), head_dims=(64, 64), dropout=0.5, classifier_bias=True,
        embedding_lr_multiplier=1.0)
    stage = training.StageConfig(
        stage=1, epochs=EPOCHS, lr_values=(0.02,), lr_boundaries=(),
        loss_weights=training.LossWeights.parse("1:1:1"), train_backbone=True)
    model_dir = str(root / "run")
    training.train(training.TrainConfig(
        model_dir=model_dir, shard_dir=shard_dir, model=model, stages=[stage], batch_size=16,
        flip="off", log_every_steps=1000, validate_every_epochs=EPOCHS, eval_flip_images=False,
        projector_images=0, results_checkpoint="last"))
    exported = export.export_run(model_dir, shard_dir=shard_dir, flip_images=False,
                                 shift_texts=True, checkpoint="last")
    images = json.loads(Path(dataset_json).read_text())["images"]
    train_captions = {image["filename"]: [sentence["raw"] for sentence in image["sentences"]]
                      for image in images if image["split"] == "train"}
    return SearchSetup(Path(data.raw_dir), shard_dir, exported.export_dir, train_captions)


@pytest.fixture(scope="module")
def encoders(setup) -> search.Encoders:
    return search.Encoders(setup.export_dir)


@pytest.fixture(scope="module")
def train_index(setup, encoders) -> search.SearchIndex:
    return search.index_shards(encoders, setup.shard_dir, "train", batch_size=32)


def run_search(*args) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "experiments.search", *args], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the printed results table: [rank, score, name]."""
    lines = stdout.splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("rank")) + 2
    rows = []
    for line in lines[start:]:
        if not re.match(r"^\d+\s", line):
            break
        rows.append(line.split(maxsplit=2))
    return rows


def test_shard_index_finds_each_captions_own_image_far_above_chance(train_index, setup):
    index = train_index
    assert len(index.image_names) == NUM_TRAIN
    assert set(index.image_names) == set(setup.train_captions)
    assert len(index.captions) == 5 * NUM_TRAIN
    for caption, row in zip(index.captions[:10], index.caption_image[:10]):
        assert caption in setup.train_captions[index.image_names[row]]
    norms = np.linalg.norm(index.image_embeddings, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)

    found = [row in search.top_k(query, index.image_embeddings, 5)[0]
             for query, row in zip(index.caption_embeddings, index.caption_image)]
    assert np.mean(found) > 4 * CHANCE_AT_5, f"text->image R@5 {np.mean(found):.3f}"
    own_caption = [np.isin(search.top_k(query, index.caption_embeddings, 5)[0],
                           np.flatnonzero(index.caption_image == row)).any()
                   for row, query in enumerate(index.image_embeddings)]
    assert np.mean(own_caption) > 4 * CHANCE_AT_5, f"image->text R@5 {np.mean(own_caption):.3f}"


def test_index_save_load_round_trip_and_a_bad_file(train_index, tmp_path):
    path = str(tmp_path / "sub" / "train.npz")
    train_index.save(path)
    loaded = search.SearchIndex.load(path)
    assert loaded.image_names == train_index.image_names
    assert loaded.captions == train_index.captions
    assert (loaded.model, loaded.source_kind, loaded.split) == (train_index.model, search.SHARDS,
                                                                "train")
    np.testing.assert_array_equal(loaded.image_embeddings, train_index.image_embeddings)
    np.testing.assert_array_equal(loaded.caption_image, train_index.caption_image)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"bad\.npz: not a search index"):
        search.SearchIndex.load(str(tmp_path / "bad.npz"))


def test_shard_index_rows_give_back_their_images(train_index, encoders, tmp_path):
    images = search.index_image_bytes(train_index, [5, 0])
    assert sorted(images) == [0, 5]
    np.testing.assert_allclose(encoders.images([images[5], images[0]]),
                               train_index.image_embeddings[[5, 0]], atol=1e-5)
    sheet = tmp_path / "sheet.png"
    search.write_contact_sheet(str(sheet), "two", [search.SheetRow(images[5], ["five"]),
                                                   search.SheetRow(None, ["no image"])])
    with Image.open(sheet) as picture:
        assert picture.format == "PNG"
        assert picture.height > search.SHEET_THUMBNAIL
    with pytest.raises(ValueError, match=r"sheet\.gif: a contact sheet is \.html or \.png"):
        search.write_contact_sheet(str(tmp_path / "sheet.gif"), "two", [])


def test_bad_inputs_are_named(encoders, tmp_path):
    broken = tmp_path / "only" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG but truncated")
    with pytest.raises(ValueError, match=r"broken\.png: not a decodable image"):
        search.embed_image_file(encoders, str(broken))
    with pytest.raises(ValueError, match=r"only: none of its 1 image files could be decoded"):
        search.index_folder(encoders, str(broken.parent))
    with pytest.raises(FileNotFoundError, match="no SavedModel"):
        search.Encoders(str(tmp_path))
    with pytest.raises(ValueError, match="has no words"):
        search.word_importance(encoders, np.ones(4, np.float32), " ,. ")


def test_top_k_orders_by_score_and_keeps_row_order_on_ties():
    candidates = np.array([[0, 1], [1, 0], [0.6, 0.8], [1, 0]], np.float32)
    rows, scores = search.top_k(np.array([1, 0], np.float32), candidates, 3)
    assert rows.tolist() == [1, 3, 2]
    np.testing.assert_allclose(scores, [1, 1, 0.6])
    with pytest.raises(ValueError, match="different models"):
        search.top_k(np.ones(3, np.float32), candidates, 2)


def test_find_images_recurses_and_filters_by_extension(tmp_path):
    for name in ("b.JPG", "a.png", "sub/deeper/c.jpeg", "notes.txt", "d.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [Path(path).relative_to(tmp_path).as_posix()
             for path in search.find_images(str(tmp_path))]
    assert found == ["a.png", "b.JPG", "sub/deeper/c.jpeg"]


def test_command_indexes_a_folder_skipping_a_corrupt_image_and_answers_a_text_query(
        setup, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(setup.raw_dir / "images", folder / "jpeg")
    target = "000007.jpg"
    # The same picture as a PNG deeper down, and a corrupt "JPEG".
    (folder / "more" / "png").mkdir(parents=True)
    with Image.open(folder / "jpeg" / target) as picture:
        picture.save(folder / "more" / "png" / "copy.png")
    (folder / "jpeg" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    index_path = tmp_path / "photos.npz"

    indexed = run_search("index", f"--model={setup.export_dir}", f"--images={folder}",
                         f"--index={index_path}", "--batch_size=32")
    num_images = len(list((setup.raw_dir / "images").iterdir())) + 1
    assert f"indexed {num_images} images" in indexed.stdout
    assert "skipped 1 unreadable images" in indexed.stdout
    assert re.search(r"skipped .*broken\.jpg: not a decodable image", indexed.stderr)

    sheet = tmp_path / "sheet.html"
    queried = run_search("query", f"--index={index_path}",
                         f"--text={setup.train_captions[target][0]}", "--k=5", f"--output={sheet}")
    rows = table_rows(queried.stdout)
    assert [row[0] for row in rows] == ["1", "2", "3", "4", "5"]
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(row[2]).is_file() for row in rows)
    html = sheet.read_text()
    images = re.findall(r'src="data:image/(jpeg|png);base64,([^"]+)"', html)
    assert len(images) == 5
    assert base64.b64decode(images[0][1])[:2] in (b"\xff\xd8", b"\x89P")
    assert all(Path(row[2]).name in html for row in rows)


def test_text_queries_rank_the_described_image_high(setup, encoders, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for name in setup.train_captions:
        shutil.copy(setup.raw_dir / "images" / name, folder / name)
    index = search.index_folder(encoders, str(folder), batch_size=32)
    assert index.skipped == [] and len(index.image_names) == NUM_TRAIN
    names = [Path(name).name for name in index.image_names]
    sentences = [captions[0] for captions in setup.train_captions.values()]
    queries = encoders.texts(sentences)
    found = [name in [names[row] for row in search.top_k(query, index.image_embeddings, 5)[0]]
             for name, query in zip(setup.train_captions, queries)]
    assert np.mean(found) > 4 * CHANCE_AT_5, f"folder text->image R@5 {np.mean(found):.3f}"


def test_command_image_query_answers_with_index_captions_and_a_png_sheet(setup, train_index,
                                                                         tmp_path):
    index_path = tmp_path / "train.npz"
    train_index.save(str(index_path))
    sheet = tmp_path / "captions.png"
    image = setup.raw_dir / "images" / "000003.jpg"
    queried = run_search("query", f"--index={index_path}", f"--image={image}", "--k=4",
                         f"--output={sheet}")
    rows = table_rows(queried.stdout)
    assert len(rows) == 4
    assert all(row[2] in train_index.captions for row in rows)
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    with Image.open(sheet) as picture:
        assert picture.format == "PNG" and picture.width > search.SHEET_THUMBNAIL

    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("a red circle\n\nsome green squares\n")
    from_file = run_search("query", f"--model={setup.export_dir}", f"--image={image}",
                           f"--captions={captions_file}", "--k=5")
    assert sorted(row[2] for row in table_rows(from_file.stdout)) == ["a red circle",
                                                                      "some green squares"]


def test_word_importance_weighs_colours_above_articles(setup, encoders):
    colour_drops, article_drops = [], []
    for name, captions in setup.train_captions.items():
        embedding = search.embed_image_file(encoders, str(setup.raw_dir / "images" / name))
        for caption in captions:
            importance = search.word_importance(encoders, embedding, caption)
            words = text.tokenize(caption)
            assert importance.words == words and importance.drops.shape == (len(words),)
            colour_drops += [drop for word, drop in zip(words, importance.drops)
                             if word in synthetic.COLOURS]
            article_drops += [drop for word, drop in zip(words, importance.drops)
                              if word in ("a", "the")]
    np.testing.assert_allclose(importance.score, encoders.texts([caption])[0] @ embedding,
                               atol=1e-5)
    # About 0.036 against 0.007 with this seed: single drops are noisy (a tiny model), means
    # over the 320 training captions are not.
    assert np.mean(colour_drops) > np.mean(article_drops) + 0.01, (
        np.mean(colour_drops), np.mean(article_drops))


def test_command_words_prints_one_drop_per_word_and_draws_the_chart(setup, tmp_path):
    name, captions = next(iter(setup.train_captions.items()))
    chart = tmp_path / "words.png"
    result = run_search("words", f"--model={setup.export_dir}",
                        f"--image={setup.raw_dir / 'images' / name}", f"--caption={captions[0]}",
                        f"--output={chart}")
    words = text.tokenize(captions[0])
    lines = result.stdout.splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("word")) + 2
    table = [line.split() for line in lines[start:start + len(words)]]
    assert [row[0] for row in table] == words
    assert all(re.fullmatch(r"[+-]\d\.\d{4}", row[1]) for row in table)
    with Image.open(chart) as picture:
        assert picture.format == "PNG"
        assert picture.height > len(words) * 10
