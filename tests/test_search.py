"""Retrieval with an exported model: dual_path/search.py, experiments/search_render.py and the
dual-path-search command (experiments/search.py).

Most tests search the test split of the shared `trained_run` (12 images, 60 captions),
exported once here: the index must hold the split in index order and give its images back,
a folder of the same images must embed as the shards do, the index must skip a corrupt file
with a warning naming it, and the commands must print their tables and write their contact
sheets and word chart. That model is trained for 5 steps a stage: its image embeddings differ
from image to image (a mixed-up row fails the comparisons above), but it ranks at chance
(text->image R@1 = 1/N on its splits). So the two tests that judge retrieval itself (a caption
finds its own image far above chance; colour words weigh more than articles) use `retrieving`,
a model trained here for about 30 s on 64 synthetic images.
"""
import base64
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
from dual_path import export, input_pipeline, search, text, training
from dual_path.config import TrainConfig
from experiments import search_render

from conftest import tiny_model, tiny_stage

REPO = Path(__file__).resolve().parents[1]
SPLIT = "test"  # of trained_run's shards


@pytest.fixture(scope="module")
def export_dir(trained_run, tmp_path_factory) -> str:
    """The shared run's last checkpoint as a SavedModel (no mirrored image, captions summed
    over positions: the run's evaluation settings)."""
    return export.export_run(trained_run.model_dir, shard_dir=trained_run.shard_dir,
                             flip_images=False, shift_texts=True, checkpoint="last",
                             export_dir=str(tmp_path_factory.mktemp("search_export") / "1")
                             ).export_dir


@pytest.fixture(scope="module")
def encoders(export_dir) -> search.Encoders:
    return search.Encoders(export_dir)


@pytest.fixture(scope="module")
def split_index(trained_run, encoders) -> search.SearchIndex:
    """The SPLIT of the shared run's shards, embedded 5 images at a time (several batches)."""
    return search.index_shards(encoders, trained_run.shard_dir, SPLIT, batch_size=5)


@pytest.fixture(scope="module")
def photos(split_index, tmp_path_factory) -> Path:
    """A folder of the split's images: the shards' JPEG bytes, named as in the shards."""
    folder = tmp_path_factory.mktemp("photos")
    for row, data in search.index_image_bytes(split_index,
                                              range(len(split_index.image_names))).items():
        (folder / Path(split_index.image_names[row]).name).write_bytes(data)
    return folder


def first_caption(index: search.SearchIndex, row: int) -> str:
    """The first caption of the index's image `row`."""
    return index.captions[int(np.flatnonzero(index.caption_image == row)[0])]


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


# ---- the index -----------------------------------------------------------------------------

def test_shard_index_holds_the_split_in_index_order(trained_run, split_index):
    manifest = input_pipeline.load_manifest(trained_run.shard_dir)
    num_images = input_pipeline.split_count(manifest, SPLIT, input_pipeline.MANIFEST_NUM_IMAGES)
    captions, caption_image = input_pipeline.read_caption_texts(trained_run.shard_dir, SPLIT)
    assert len(split_index.image_names) == len(split_index.image_embeddings) == num_images
    assert split_index.captions == captions
    np.testing.assert_array_equal(split_index.caption_image, caption_image)
    assert split_index.caption_embeddings.shape == (len(captions),
                                                    split_index.image_embeddings.shape[1])
    np.testing.assert_allclose(np.linalg.norm(split_index.image_embeddings, axis=1), 1.0,
                               atol=1e-4)
    assert (split_index.source_kind, split_index.split, split_index.skipped) == (search.SHARDS,
                                                                                 SPLIT, [])


def test_index_save_load_round_trip_and_a_bad_file(split_index, tmp_path):
    path = str(tmp_path / "sub" / "test.npz")
    split_index.save(path)
    assert [entry.name for entry in (tmp_path / "sub").iterdir()] == ["test.npz"]  # no .tmp
    loaded = search.SearchIndex.load(path)
    assert loaded.image_names == split_index.image_names
    assert loaded.captions == split_index.captions
    assert (loaded.model, loaded.source_kind, loaded.split) == (split_index.model, search.SHARDS,
                                                                SPLIT)
    np.testing.assert_array_equal(loaded.image_embeddings, split_index.image_embeddings)
    np.testing.assert_array_equal(loaded.caption_image, split_index.caption_image)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"bad\.npz: not a search index"):
        search.SearchIndex.load(str(tmp_path / "bad.npz"))


def test_shard_index_rows_give_back_their_images(split_index, encoders):
    images = search.index_image_bytes(split_index, [5, 0])
    assert sorted(images) == [0, 5]
    np.testing.assert_allclose(encoders.images([images[5], images[0]]),
                               split_index.image_embeddings[[5, 0]], atol=1e-5)


def test_a_folder_index_embeds_each_file_as_its_shard_image(split_index, encoders, photos):
    index = search.index_folder(encoders, str(photos), batch_size=5)
    assert index.skipped == [] and index.captions == []
    assert index.image_names == sorted(str(path) for path in photos.iterdir())
    shard_row = {Path(name).name: row for row, name in enumerate(split_index.image_names)}
    rows = [shard_row[Path(name).name] for name in index.image_names]
    np.testing.assert_allclose(index.image_embeddings, split_index.image_embeddings[rows],
                               atol=1e-5)


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


def test_word_importance_is_the_similarity_drop_without_each_word(split_index, encoders):
    caption = first_caption(split_index, 3)
    embedding = split_index.image_embeddings[3]
    importance = search.word_importance(encoders, embedding, caption)
    words = text.tokenize(caption)
    assert importance.words == words
    np.testing.assert_allclose(importance.score, encoders.texts([caption])[0] @ embedding,
                               atol=1e-5)
    without = encoders.texts([" ".join(words[:i] + words[i + 1:]) for i in range(len(words))])
    np.testing.assert_allclose(importance.drops, importance.score - without @ embedding,
                               atol=1e-5)


# ---- pictures (experiments/search_render.py) ----------------------------------------------

def test_png_contact_sheet_and_a_wrong_extension(photos, tmp_path):
    image = next(photos.iterdir()).read_bytes()
    sheet = tmp_path / "sheet.png"
    search_render.write_contact_sheet(str(sheet), "two", [
        search_render.SheetRow(image, ["five"]), search_render.SheetRow(None, ["no image"])])
    with Image.open(sheet) as picture:
        assert picture.format == "PNG"
        assert picture.height > search_render.SHEET_THUMBNAIL
    with pytest.raises(ValueError, match=r"sheet\.gif: a contact sheet is \.html or \.png"):
        search_render.write_contact_sheet(str(tmp_path / "sheet.gif"), "two", [])


def test_word_chart_has_a_row_per_word(photos, tmp_path):
    importance = search.WordImportance(["a", "red", "circle"], 0.5,
                                       np.array([-0.01, 0.2, 0.05], np.float32))
    chart = tmp_path / "words.png"
    search_render.draw_word_importance(str(chart), importance, "title",
                                       next(photos.iterdir()).read_bytes())
    with Image.open(chart) as picture:
        assert picture.format == "PNG"
        assert picture.height > search_render.SHEET_THUMBNAIL + 3 * 10


# ---- the command ---------------------------------------------------------------------------

@pytest.mark.subprocess
def test_command_indexes_a_folder_skipping_a_corrupt_image_and_answers_a_text_query(
        split_index, export_dir, photos, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder / "jpeg")
    target = 7
    # The same picture as a PNG deeper down, and a corrupt "JPEG".
    (folder / "more" / "png").mkdir(parents=True)
    with Image.open(folder / "jpeg" / Path(split_index.image_names[target]).name) as picture:
        picture.save(folder / "more" / "png" / "copy.png")
    (folder / "jpeg" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    index_path = tmp_path / "photos.npz"

    indexed = run_search("index", f"--model={export_dir}", f"--images={folder}",
                         f"--index={index_path}", "--batch_size=32")
    assert f"indexed {len(split_index.image_names) + 1} images" in indexed.stdout
    assert "skipped 1 unreadable images" in indexed.stdout
    assert re.search(r"skipped .*broken\.jpg: not a decodable image", indexed.stderr)

    sheet = tmp_path / "sheet.html"
    queried = run_search("query", f"--index={index_path}",
                         f"--text={first_caption(split_index, target)}", "--k=5",
                         f"--output={sheet}")
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


@pytest.mark.subprocess
def test_command_image_query_answers_with_index_captions_and_a_png_sheet(
        split_index, export_dir, photos, tmp_path):
    index_path = tmp_path / "test.npz"
    split_index.save(str(index_path))
    sheet = tmp_path / "captions.png"
    image = photos / Path(split_index.image_names[3]).name
    queried = run_search("query", f"--index={index_path}", f"--image={image}", "--k=4",
                         f"--output={sheet}")
    rows = table_rows(queried.stdout)
    assert len(rows) == 4
    assert all(row[2] in split_index.captions for row in rows)
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    with Image.open(sheet) as picture:
        assert picture.format == "PNG" and picture.width > search_render.SHEET_THUMBNAIL

    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("a red circle\n\nsome green squares\n")
    from_file = run_search("query", f"--model={export_dir}", f"--image={image}",
                           f"--captions={captions_file}", "--k=5")
    assert sorted(row[2] for row in table_rows(from_file.stdout)) == ["a red circle",
                                                                      "some green squares"]


@pytest.mark.subprocess
def test_command_words_prints_one_drop_per_word_and_draws_the_chart(split_index, export_dir,
                                                                    photos, tmp_path):
    caption = first_caption(split_index, 0)
    chart = tmp_path / "words.png"
    result = run_search("words", f"--model={export_dir}",
                        f"--image={photos / Path(split_index.image_names[0]).name}",
                        f"--caption={caption}", f"--output={chart}")
    words = text.tokenize(caption)
    lines = result.stdout.splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("word")) + 2
    table = [line.split() for line in lines[start:start + len(words)]]
    assert [row[0] for row in table] == words
    assert all(re.fullmatch(r"[+-]\d\.\d{4}", row[1]) for row in table)
    with Image.open(chart) as picture:
        assert picture.format == "PNG"
        assert picture.height > len(words) * 10


# ---- a model that retrieves well -----------------------------------------------------------

RETRIEVING_IMAGE_SIZE = 32
RETRIEVING_NUM_TRAIN = 64
RETRIEVING_EPOCHS = 120  # of 4 steps: about 30 s on a loaded 2-core CPU
CHANCE_AT_5 = 5 / RETRIEVING_NUM_TRAIN


class Retrieving(NamedTuple):
    """encoders: the exported model; train_index: its shard index of the training split
    (RETRIEVING_NUM_TRAIN images, 5 captions each)."""

    encoders: search.Encoders
    train_index: search.SearchIndex


@pytest.fixture(scope="module")
def retrieving(synthetic_shards, tmp_path_factory) -> Retrieving:
    """A model trained until it knows its training images (instance and ranking loss,
    backbone trained from the start), exported and indexed on its training split.

    It is trained here, not taken from `trained_run`, because the two tests that use it judge
    retrieval quality, and the shared run's 5 steps a stage leave it ranking at chance."""
    data = synthetic_shards("search", num_train=RETRIEVING_NUM_TRAIN, num_val=8,
                            image_size=RETRIEVING_IMAGE_SIZE)
    model = tiny_model(data.manifest, image_size=RETRIEVING_IMAGE_SIZE,
                       small_cnn_widths=(16, 32), text_widths=(32, 64), head_dims=(64, 64),
                       classifier_bias=True, embedding_lr_multiplier=1.0)
    stage = tiny_stage(1, "1:1:1", epochs=RETRIEVING_EPOCHS, lr_values=(0.02,),
                       train_backbone=True)
    model_dir = str(tmp_path_factory.mktemp("retrieving") / "run")
    training.train(TrainConfig(
        model_dir=model_dir, shard_dir=data.shard_dir, model=model, stages=[stage],
        batch_size=16, flip="off", log_every_steps=1000, validate_every_epochs=RETRIEVING_EPOCHS,
        eval_flip_images=False, projector_images=0, results_checkpoint="last"))
    exported = export.export_run(model_dir, shard_dir=data.shard_dir, flip_images=False,
                                 shift_texts=True, checkpoint="last")
    encoders = search.Encoders(exported.export_dir)
    return Retrieving(encoders, search.index_shards(encoders, data.shard_dir, "train",
                                                    batch_size=32))


def test_a_trained_model_finds_each_captions_own_image_far_above_chance(retrieving):
    index = retrieving.train_index
    assert len(index.image_names) == RETRIEVING_NUM_TRAIN
    found = [row in search.top_k(query, index.image_embeddings, 5)[0]
             for query, row in zip(index.caption_embeddings, index.caption_image)]
    assert np.mean(found) > 4 * CHANCE_AT_5, f"text->image R@5 {np.mean(found):.3f}"
    own_caption = [np.isin(search.top_k(query, index.caption_embeddings, 5)[0],
                           np.flatnonzero(index.caption_image == row)).any()
                   for row, query in enumerate(index.image_embeddings)]
    assert np.mean(own_caption) > 4 * CHANCE_AT_5, f"image->text R@5 {np.mean(own_caption):.3f}"


def test_word_importance_weighs_colours_above_articles(retrieving):
    index = retrieving.train_index
    colour_drops, article_drops = [], []
    for caption, row in zip(index.captions, index.caption_image):
        importance = search.word_importance(retrieving.encoders, index.image_embeddings[row],
                                            caption)
        colour_drops += [drop for word, drop in zip(importance.words, importance.drops)
                         if word in synthetic.COLOURS]
        article_drops += [drop for word, drop in zip(importance.words, importance.drops)
                          if word in ("a", "the")]
    # About 0.036 against 0.007 with this seed: single drops are noisy (a tiny model), means
    # over the 320 training captions are not.
    assert np.mean(colour_drops) > np.mean(article_drops) + 0.01, (
        np.mean(colour_drops), np.mean(article_drops))
