"""The embedded synthetic dataset: files, Karpathy schema, determinism, captions, scenes."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf


from data_prep import records, synthetic
from dual_path import text

SMALL = dict(num_train=30, num_val=10, num_test=12, image_size=32)

# Caption words -> canonical attribute names.
SIZE_OF = {word: size for size, words in synthetic.SIZE_WORDS.items() for word in words}
SHAPE_OF = {pair[0].split()[0]: shape for shape, pairs in synthetic.SHAPE_WORDS.items() for pair in pairs}


def _files(root):
    contents = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                contents[os.path.relpath(path, root)] = handle.read()
    return contents


def _edit_distance_is_one(scene_a, scene_b) -> bool:
    """Whether the scenes differ in exactly one object attribute, or by one object."""
    if abs(len(scene_a) - len(scene_b)) == 1:
        small, large = sorted((scene_a, scene_b), key=len)
        return set(small) < set(large)
    if len(scene_a) != len(scene_b):
        return False
    only_a, only_b = set(scene_a) - set(scene_b), set(scene_b) - set(scene_a)
    if len(only_a) != 1 or len(only_b) != 1:
        return False
    (a,), (b,) = only_a, only_b
    fields = [(a.row, a.column) != (b.row, b.column), a.colour != b.colour, a.shape != b.shape, a.size != b.size]
    return sum(fields) == 1


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.generate(output_dir, seed=3, **SMALL)
    return output_dir


def test_writes_karpathy_json_and_decodable_images(dataset_dir):
    with open(os.path.join(dataset_dir, synthetic.JSON_NAME)) as handle:
        dataset = json.load(handle)
    assert dataset["dataset"] == "synthetic"
    images = dataset["images"]
    assert [image["imgid"] for image in images] == list(range(52))
    assert collections.Counter(image["split"] for image in images) == {"train": 30, "val": 10, "test": 12}
    for image in images:
        assert image["filepath"] == "images"
        assert image["filename"] == f"{image['imgid']:06d}.jpg"
        with open(os.path.join(dataset_dir, image["filepath"], image["filename"]), "rb") as handle:
            pixels = tf.io.decode_jpeg(handle.read())
        assert pixels.shape == (32, 32, 3)
        sentences = image["sentences"]
        assert len(sentences) == 5
        assert image["sentids"] == [image["imgid"] * 5 + k for k in range(5)]
        assert [s["sentid"] for s in sentences] == image["sentids"]
        for sentence in sentences:
            assert sentence["imgid"] == image["imgid"]
            assert sentence["tokens"] == text.tokenize(sentence["raw"])
            assert 1 <= len(sentence["tokens"]) <= records.DEFAULT_MAX_LENGTH
    assert not [name for name in os.listdir(os.path.join(dataset_dir, "images")) if not name.endswith(".jpg")]


def test_same_seed_same_bytes_other_seed_other_bytes(dataset_dir, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    synthetic.generate(again, seed=3, **SMALL)
    synthetic.generate(other, seed=4, **SMALL)
    reference = _files(dataset_dir)
    assert _files(again) == reference
    other_files = _files(other)
    assert other_files.keys() == reference.keys()
    assert other_files[synthetic.JSON_NAME] != reference[synthetic.JSON_NAME]
    assert all(other_files[name] != reference[name] for name in reference)


def test_a_split_does_not_depend_on_the_other_splits_sizes(dataset_dir, tmp_path):
    smaller = str(tmp_path / "smaller")
    synthetic.generate(smaller, seed=3, num_train=5, num_val=10, num_test=12, image_size=32)

    def test_split(root):
        with open(os.path.join(root, synthetic.JSON_NAME)) as handle:
            images = [image for image in json.load(handle)["images"] if image["split"] == "test"]
        files = _files(os.path.join(root, "images"))
        return [([s["raw"] for s in image["sentences"]], files[image["filename"]]) for image in images]

    assert test_split(smaller) == test_split(dataset_dir)


def test_val_and_test_descriptions_are_unique_and_near_duplicates_common():
    for split in synthetic.UNIQUE_SPLITS:
        scenes = synthetic.split_scenes(split, 1000, seed=0)
        assert len({synthetic.describe(scene) for scene in scenes}) == 1000
    scenes = synthetic.split_scenes("test", 1000, seed=0)
    with_neighbour = sum(
        any(_edit_distance_is_one(scene, other) for other in scenes) for scene in scenes[:200]
    )
    assert with_neighbour >= 60
    assert collections.Counter(len(scene) for scene in scenes).keys() == {1, 2, 3, 4}
    objects = [obj for scene in scenes for obj in scene]
    assert {obj.colour for obj in objects} == set(synthetic.COLOURS)
    assert {obj.shape for obj in objects} == set(synthetic.SHAPES)
    assert {(obj.row, obj.column) for obj in objects} == {(r, c) for r in range(3) for c in range(3)}


def test_every_mutation_changes_the_description_by_one_attribute():
    rng = np.random.default_rng(7)
    for _ in range(300):
        scene = synthetic.sample_scene(rng)
        mutated = synthetic.mutate(scene, rng)
        assert _edit_distance_is_one(scene, mutated)
        assert synthetic.describe(mutated) != synthetic.describe(scene)
        assert len({(obj.row, obj.column) for obj in mutated}) == len(mutated)


def test_two_captions_give_every_object_and_its_position():
    rng = np.random.default_rng(1)
    for scene in synthetic.split_scenes("train", 300, seed=1):
        for caption in synthetic.captions(scene, rng)[:2]:
            tokens = text.tokenize(caption)
            assert sorted(t for t in tokens if t in synthetic.COLOURS) == sorted(o.colour for o in scene)
            assert sorted(SIZE_OF[t] for t in tokens if t in SIZE_OF) == sorted(o.size for o in scene)
            assert sorted(SHAPE_OF[t] for t in tokens if t in SHAPE_OF) == sorted(o.shape for o in scene)
            assert tokens.count("left") == sum(o.column == 0 for o in scene), caption
            assert tokens.count("right") == sum(o.column == 2 for o in scene), caption
            assert tokens.count("top") + tokens.count("upper") == sum(o.row == 0 for o in scene), caption
            assert tokens.count("bottom") + tokens.count("lower") == sum(o.row == 2 for o in scene), caption


def test_caption_vocabulary_covers_attributes_counts_relations_and_flips_safely():
    rng = np.random.default_rng(2)
    vocabulary = collections.Counter()
    for scene in synthetic.split_scenes("train", 300, seed=2):
        made = synthetic.captions(scene, rng)
        assert len(made) == 5
        for caption in made:
            vocabulary.update(text.tokenize(caption))
    expected = set(synthetic.COLOURS) | {"small", "large", "circle", "square", "triangle", "cross"}
    expected |= {"two", "three", "four", "circles", "left", "right", "above", "below", "top", "bottom", "center"}
    assert expected <= vocabulary.keys()
    # A horizontal flip swaps only the words "left" and "right".
    assert {word for word in vocabulary if "left" in word or "right" in word} == {"left", "right"}
    assert not {"east", "west", "first", "last"} & vocabulary.keys()


def test_interrupted_run_leaves_no_json(tmp_path, monkeypatch):
    output_dir = str(tmp_path)
    synthetic.generate(output_dir, num_train=3, num_val=1, num_test=1, image_size=32)
    calls = []

    def failing_render(*args):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original_render(*args)

    original_render = synthetic.render
    monkeypatch.setattr(synthetic, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(output_dir, num_train=6, num_val=1, num_test=1, image_size=32)
    assert not os.path.exists(os.path.join(output_dir, synthetic.JSON_NAME))


@pytest.mark.parametrize("arguments", [dict(image_size=16), dict(num_test=-1)])
def test_bad_arguments_are_refused(tmp_path, arguments):
    with pytest.raises(ValueError, match="image_size|num_test"):
        synthetic.generate(str(tmp_path), **arguments)


@pytest.mark.subprocess
def test_command_line_writes_the_dataset(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "data_prep.generate_synthetic", f"--output_dir={tmp_path}",
         "--num_train=4", "--num_val=2", "--num_test=2", "--image_size=32", "--seed=5"],
        check=True, capture_output=True,
    )
    with open(tmp_path / synthetic.JSON_NAME) as handle:
        assert len(json.load(handle)["images"]) == 8
    assert len(os.listdir(tmp_path / "images")) == 8
