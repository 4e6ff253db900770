"""experiments/evaluate.py and dual_path/protocols.py.

The command runs as a subprocess on (a copy of) the shared tiny trained run and must report
exactly the metrics of embeddings computed directly (SplitEmbedder on the restored model);
an exported SavedModel must give the same numbers; person search runs on a CUHK-style copy
of the run's test split whose labels are person ids shared by two images each; protocols
are checked on hand-made similarities.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dual_path import embeddings, evaluation, export, input_pipeline, protocols, run_layout
from dual_path import shard_format
from experiments import evaluate, tables

from conftest import TRAINED_RUN_FLIP_IMAGES, TRAINED_RUN_SHIFT_TEXTS

REPO = Path(__file__).resolve().parents[1]


def copy_run(trained_run, target: Path, **run_settings) -> str:
    """The shared run copied (it is shared: nothing is written into it), `run_settings`
    (e.g. eval_flip_images=True) replacing those of its config.json."""
    shutil.copytree(trained_run.model_dir, target)
    config_path = target / run_layout.RUN_CONFIG_NAME
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **run_settings}))
    return str(target)


def run_evaluate(*arguments: str) -> subprocess.CompletedProcess:
    process = subprocess.run([sys.executable, "-m", "experiments.evaluate", *arguments], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return process


def direct_embeddings(model_dir: str, image_encoder, text_encoder, shard_dir: str, *,
                      flip_images: bool, shift_texts: bool) -> embeddings.SplitEmbeddings:
    """The test split embedded by SplitEmbedder itself, with the run's S and L."""
    config = run_layout.load_model_config(model_dir)
    return embeddings.SplitEmbedder(
        image_encoder, text_encoder, image_size=config.image_size, max_length=config.max_length,
        flip_images=flip_images, shift_texts=shift_texts)(shard_dir, "test")


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory):
    """dual-path-evaluate on a copy of the run whose config.json says: no mirrored images,
    captions summed over positions. Returns (model_dir, the process, its results JSON)."""
    model_dir = copy_run(trained_run, tmp_path_factory.mktemp("evaluated") / "run",
                         eval_flip_images=False, eval_shift_texts=True)
    process = run_evaluate(f"--model_dir={model_dir}", "--checkpoint=last")
    output = Path(model_dir, "eval_test_flickr_1k.json")  # auto: synthetic, one fold
    return model_dir, process, json.loads(output.read_text())


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory) -> dict:
    """Two SavedModels of the run's last checkpoint, by dual_path.export: "plain" (no
    mirror, captions summed over positions) and "mirrored" (the opposite)."""
    root = tmp_path_factory.mktemp("exports")
    return {name: export.export_run(trained_run.model_dir, shard_dir=trained_run.shard_dir,
                                    flip_images=flip, shift_texts=not flip, checkpoint="last",
                                    export_dir=str(root / name)).export_dir
            for name, flip in (("plain", False), ("mirrored", True))}


@pytest.mark.subprocess
def test_command_reports_the_metrics_of_directly_computed_embeddings(trained_run,
                                                                    evaluated_run):
    model_dir, process, results = evaluated_run
    # Defaults from config.json: its shard_dir, eval_flip_images, eval_shift_texts.
    assert results["flip_images"] is False and results["shift_texts"] is True
    assert results["shard_dir"] == trained_run.shard_dir and results["split"] == "test"
    model, last = run_layout.restore(model_dir, "last")
    assert results["checkpoint"] == last and results["model_dir"] == model_dir
    assert results["flags"]["checkpoint"] == "last" and results["flags"]["protocol"] == "auto"
    assert set(results["timing"]) == {"load_seconds", "embed_seconds", "metrics_seconds",
                                      "total_seconds"}

    split = direct_embeddings(model_dir, model.image_encoder, model.text_encoder,
                              trained_run.shard_dir, flip_images=False, shift_texts=True)
    expected = evaluation.retrieval_metrics(split.image @ split.text.T, split.image_of_text)
    assert results["metrics"] == pytest.approx(expected, abs=1e-9)
    assert results["num_images"] == len(split.image)
    assert results["num_captions"] == len(split.text)

    rows = {line.split()[0]: line.split()[1:] for line in process.stdout.splitlines()
            if line.startswith(("image->text", "text->image", "rsum"))}
    for direction, prefix in (("image->text", "i2t"), ("text->image", "t2i")):
        assert rows[direction] == [f"{expected[f'{prefix}_{key}']:.2f}"
                                   for key in ("r1", "r5", "r10", "medr", "meanr")]
    assert rows["rsum"] == [f"{expected['rsum']:.2f}"]
    assert "\n".join(tables.retrieval_table(results["metrics"])) in process.stdout
    assert str(Path(model_dir, "eval_test_flickr_1k.json")) in process.stdout


@pytest.mark.subprocess
def test_saved_model_gives_the_numbers_of_the_model_dir(trained_run, evaluated_run, exports):
    _, _, from_model_dir = evaluated_run
    process = run_evaluate(f"--saved_model={exports['plain']}")
    output = Path(exports["plain"] + "_eval_test_flickr_1k.json")
    results = json.loads(output.read_text())
    # shard_dir, flip and shift from export_info.json: those of the model_dir run.
    assert results["saved_model"] == exports["plain"]
    checkpoint = Path(from_model_dir["checkpoint"]).relative_to(from_model_dir["model_dir"])
    assert results["checkpoint"] == str(Path(trained_run.model_dir, checkpoint))
    assert (results["flip_images"], results["shift_texts"]) == (False, True)
    assert results["metrics"] == pytest.approx(from_model_dir["metrics"], abs=1e-9)
    assert f"rsum {from_model_dir['metrics']['rsum']:9.2f}".split() in [
        line.split() for line in process.stdout.splitlines()]


def test_a_mirroring_export_and_a_plain_one_equal_the_model_with_mirrored_images(trained_run,
                                                                                exports):
    def metrics(encoders, flip_images):
        return evaluate.evaluate(encoders, trained_run.shard_dir, "test", "flickr_1k",
                                 flip_images=flip_images, shift_texts=False)["metrics"]

    expected = metrics(evaluate.restore_encoders(trained_run.model_dir, "last"), True)
    mirrored = evaluate.load_saved_model(exports["mirrored"])
    assert mirrored.mirrors_images and mirrored.defaults["flip_images"] is True
    assert metrics(mirrored, True) == pytest.approx(expected, abs=1e-9)
    # A plain export is mirrored by SplitEmbedder instead, with the same result.
    assert metrics(evaluate.load_saved_model(exports["plain"]), True) == \
        pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match=r"export_info.json: the export adds the mirrored"):
        metrics(mirrored, False)


def write_person_shards(source_dir: str, target_dir: str, split: str, images_per_person: int):
    """Copies `split` of source_dir in the shard format with label = image index //
    images_per_person (a person id shared by several images), named as CUHK-PEDES."""
    target = Path(target_dir)
    target.mkdir()

    def rewrite(kind: str, features: dict, serialize) -> None:
        for path in shard_format.shard_files(source_dir, split, kind):
            with tf.io.TFRecordWriter(str(target / Path(path).name)) as writer:
                for record in tf.data.TFRecordDataset(path):
                    writer.write(serialize(tf.io.parse_single_example(record, features)))

    def image(example) -> bytes:
        index = int(example[shard_format.IMAGE_INDEX])
        return shard_format.image_example(
            example[shard_format.IMAGE_ENCODED].numpy(),
            example[shard_format.IMAGE_SOURCE_ID].numpy().decode(),
            example[shard_format.IMAGE_FILENAME].numpy().decode(),
            int(example[shard_format.IMAGE_HEIGHT]), int(example[shard_format.IMAGE_WIDTH]),
            label=index // images_per_person, index=index)

    def caption(example) -> bytes:
        index = int(example[shard_format.IMAGE_INDEX])
        return shard_format.caption_example(
            tf.sparse.to_dense(example[shard_format.CAPTION_TOKEN_IDS]).numpy().tolist(),
            example[shard_format.CAPTION_TEXT].numpy().decode(),
            int(example[shard_format.CAPTION_ID]), index, label=index // images_per_person)

    rewrite(shard_format.IMAGES, shard_format.IMAGE_FEATURES, image)
    rewrite(shard_format.CAPTIONS, shard_format.CAPTION_FEATURES, caption)
    manifest = input_pipeline.load_manifest(source_dir)
    manifest["source"]["dataset_name"] = "cuhk_pedes"
    manifest["splits"] = {split: manifest["splits"][split]}
    (target / shard_format.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_person_search_on_cuhk_style_shards_with_defaults_from_the_run_config(trained_run,
                                                                               tmp_path):
    shard_dir = str(tmp_path / "cuhk")
    write_person_shards(trained_run.shard_dir, shard_dir, "test", images_per_person=2)
    model_dir = copy_run(trained_run, tmp_path / "run", eval_flip_images=True,
                         eval_shift_texts=False)
    encoders = evaluate.restore_encoders(model_dir, "best")
    flip_images = evaluate.resolve("flip_images", None, encoders)
    shift_texts = evaluate.resolve("shift_texts", None, encoders)
    assert (flip_images, shift_texts) == (True, False)
    results = evaluate.evaluate(encoders, shard_dir, "test", protocols.AUTO,
                                flip_images=flip_images, shift_texts=shift_texts)

    assert results["protocol"] == "cuhk_pedes"  # auto, from the dataset name
    split = direct_embeddings(model_dir, encoders.image_encoder, encoders.text_encoder,
                              shard_dir, flip_images=True, shift_texts=False)
    similarity = split.image @ split.text.T
    num_images = len(split.image)
    expected = evaluation.person_search_metrics(similarity, np.arange(num_images) // 2,
                                                split.image_of_text // 2)
    assert results["metrics"] == pytest.approx(expected, abs=1e-9)
    # Another image of the same person counts: not the numbers of one id per image.
    own_image = evaluation.person_search_metrics(similarity, np.arange(num_images),
                                                 split.image_of_text)
    assert results["metrics"]["t2i_map"] != pytest.approx(own_image["t2i_map"])


# ---- flag defaults -------------------------------------------------------------------------

def test_precise_bn_blocks_reestimate_only_the_tops_statistics_before_evaluating(trained_run):
    """--precise_bn_blocks=1 on the small_cnn run: its last block's BN statistics are set from
    the run's training views (what --stage2_precise_bn does), every other weight as restored."""
    def weights(encoders) -> dict:
        return {weight.path: weight.numpy() for weight in encoders.image_encoder.weights}

    plain = weights(evaluate.restore_encoders(trained_run.model_dir, "last"))
    encoders = evaluate.restore_encoders(trained_run.model_dir, "last", precise_bn_blocks=1)
    precise = weights(encoders)
    assert {path for path in plain if not np.array_equal(plain[path], precise[path])} == {
        "small_cnn_bn2/moving_mean", "small_cnn_bn2/moving_variance"}
    assert encoders.source["precise_bn_blocks"] == 1


def test_flags_win_over_the_runs_defaults(trained_run, tmp_path):
    encoders = evaluate.restore_encoders(trained_run.model_dir, "last")
    assert encoders.defaults == {"shard_dir": trained_run.shard_dir,
                                 "flip_images": TRAINED_RUN_FLIP_IMAGES,
                                 "shift_texts": TRAINED_RUN_SHIFT_TEXTS}
    assert evaluate.resolve("flip_images", True, encoders) is True
    assert evaluate.resolve("shard_dir", None, encoders) == trained_run.shard_dir
    with pytest.raises(ValueError, match=r"shards: the shard manifest has no splits.nope.images "
                                         r"\(its splits: train, val, test\)"):
        evaluate.evaluate(encoders, trained_run.shard_dir, "nope", protocols.AUTO,
                          flip_images=False, shift_texts=False)
    recorded = encoders._replace(defaults={"flip_images": True})
    assert evaluate.resolve("flip_images", False, recorded) is False
    assert evaluate.resolve("flip_images", None, recorded) is True
    with pytest.raises(FileNotFoundError, match=r"export_info.json does not exist"):
        evaluate.load_saved_model(str(tmp_path))
    (tmp_path / "export_info.json").write_text(json.dumps({"image_size": 32, "max_length": 8}))
    with pytest.raises(ValueError, match=r"export_info.json: no flip_images, shift_texts"):
        evaluate.load_saved_model(str(tmp_path))


# ---- protocols -----------------------------------------------------------------------------

def scores(similarity, image_of_text, labels=None) -> protocols.SplitScores:
    image_of_text = np.asarray(image_of_text)
    labels = np.arange(len(similarity)) if labels is None else np.asarray(labels)
    return protocols.SplitScores(np.asarray(similarity, np.float32), image_of_text, labels,
                                 labels[image_of_text])


def test_coco_1k_is_the_mean_over_five_folds():
    # 10 images with one caption each (folds of 2). Fold 0: image 1 and caption 0 score 2.0,
    # above both's own pair, so R@1 is 1/2 there and 100% elsewhere: mean 90%. Image 2 and
    # caption 9 (folds 1 and 4) score 3.0: unseen by coco_1k, a miss each way for coco_5k.
    similarity = np.eye(10)
    similarity[1, 0] = 2.0
    similarity[2, 9] = 3.0
    one_each = np.arange(10)
    coco_1k = protocols.get_protocol("coco_1k").metrics(scores(similarity, one_each))
    assert coco_1k["t2i_r1"] == pytest.approx(90.0)
    assert coco_1k["t2i_meanr"] == pytest.approx((1.5 + 4 * 1.0) / 5)
    # i2t: image 1 finds caption 0 (2.0) before its own (1.0): R@1 of fold 0 is 50%.
    assert coco_1k["i2t_r1"] == pytest.approx(90.0)
    assert coco_1k["rsum"] == pytest.approx(90.0 * 2 + 100.0 * 4)

    coco_5k = protocols.get_protocol("coco_5k").metrics(scores(similarity, one_each))
    assert coco_5k["i2t_r1"] == pytest.approx(80.0)  # images 1 and 2 miss
    assert coco_5k["t2i_r1"] == pytest.approx(80.0)  # captions 0 and 9 miss
    assert protocols.get_protocol("flickr_1k").metrics(scores(similarity, one_each)) == coco_5k


def test_person_search_matches_every_image_of_the_person():
    # 4 images of persons 7, 7, 8, 8; caption c describes image c (columns).
    similarity = np.array([[0.5, 0.0, 0.0, 0.0],
                           [0.9, 0.2, 0.0, 0.0],
                           [0.0, 0.3, 1.0, 0.0],
                           [0.0, 0.0, 0.0, 1.0]])
    metrics = protocols.get_protocol("cuhk_pedes").metrics(scores(similarity, np.arange(4),
                                                                  [7, 7, 8, 8]))
    # Caption 0's own image is second, behind image 1 of the same person: a top-1 hit, AP 1.
    # Caption 1: image 2 (person 8) first, its person's images 2nd and 3rd (image 0 ties
    # image 3 at 0.0, matches first): a miss, AP (1/2 + 2/3) / 2. Captions 2, 3: AP 1.
    assert metrics["t2i_top1"] == pytest.approx(75.0)
    assert metrics["t2i_map"] == pytest.approx(100 * (1 + (1 / 2 + 2 / 3) / 2 + 1 + 1) / 4)


@pytest.mark.parametrize("dataset, num_images, expected", [
    ("cuhk_pedes", 3074, "cuhk_pedes"), ("CUHK-PEDES", 10, "cuhk_pedes"),
    ("coco", 5000, "coco_1k"), ("coco", 1000, "flickr_1k"), ("flickr30k", 1000, "flickr_1k"),
    ("synthetic", 10, "flickr_1k")])
def test_auto_protocol(dataset, num_images, expected):
    assert protocols.auto_protocol(dataset, num_images) == expected


def test_image_labels_come_from_their_captions_and_must_agree():
    image_of_text = np.array([0, 0, 1, 2, 2])
    labels = protocols.image_labels(image_of_text, np.array([4, 4, 4, 9, 9]), 3, "here")
    assert labels.tolist() == [4, 4, 9]
    with pytest.raises(ValueError, match=r"here: caption \d has label"):
        protocols.image_labels(image_of_text, np.array([4, 5, 4, 9, 9]), 3, "here")
    with pytest.raises(ValueError, match=r"here: an image has no caption"):
        protocols.image_labels(image_of_text, np.array([4, 4, 4, 9, 9]), 4, "here")
    with pytest.raises(ValueError, match=r"unknown protocol 'x'"):
        protocols.get_protocol("x")
