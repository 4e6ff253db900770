"""The exported SavedModel against the Keras model it came from, on the tiny trained run.

Two exports of the `trained_run` fixture (flip and shift off / on) are loaded by a clean
`python -c` that imports TensorFlow alone, after the shard files they were made from are
deleted; their embeddings are compared here with the Keras encoders on the same inputs: the
split's JPEG bytes as evaluation decodes them, a PNG, token ids from the caption shards, and
sentences tokenized and looked up in Python. Also: bad image bytes, sentences without known
words, oov="unk", mismatched vocabulary, an existing export folder, and the command.
"""
import base64
import dataclasses
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dual_path import embeddings, export, input_pipeline, run_layout, shard_format, text

REPO = Path(__file__).resolve().parents[1]
SPLIT = "val"
SENTENCES = [
    "A small RED circle, in the top-left!",
    "two blue squares to the right of a green cross",
    "a zebra next to a red circle",  # "zebra" and "next" are not in the vocabulary: dropped
    " ".join(["red circle"] * 30),  # 60 words: cut to max_length
]
NO_KNOWN_WORDS = ["", "?!...", "zebra giraffe"]

LOAD_SCRIPT = textwrap.dedent("""
    import base64, json, sys
    import numpy as np
    import tensorflow as tf
    request = json.load(open(sys.argv[1]))
    arrays = np.load(sys.argv[2])
    images = tf.constant([base64.b64decode(item) for item in request["image_bytes"]])
    outputs, report = {}, {"signatures": {}, "errors": []}
    for name, path in request["exports"].items():
        loaded = tf.saved_model.load(path)
        signatures = loaded.signatures
        report["signatures"][name] = {
            key: sorted(function.structured_input_signature[1]) for key, function in signatures.items()}
        calls = {
            "encode_images": signatures["encode_images"](image_bytes=images),
            "encode_image_tensors": signatures["encode_image_tensors"](images=arrays["images"]),
            "encode_token_ids": signatures["encode_token_ids"](token_ids=arrays["token_ids"]),
            "encode_texts": signatures["encode_texts"](sentences=tf.constant(request["sentences"])),
            "serving_default": signatures["serving_default"](sentences=tf.constant(request["sentences"])),
            "direct_encode_texts": loaded.encode_texts(tf.constant(request["sentences"])),
        }
        empty = {
            "encode_images": signatures["encode_images"](image_bytes=tf.zeros([0], tf.string)),
            "encode_image_tensors": signatures["encode_image_tensors"](
                images=tf.zeros([0, *arrays["images"].shape[1:]])),
            "encode_token_ids": signatures["encode_token_ids"](
                token_ids=tf.zeros([0, arrays["token_ids"].shape[1]], tf.int32)),
            "encode_texts": signatures["encode_texts"](sentences=tf.zeros([0], tf.string)),
            "serving_default": signatures["serving_default"](sentences=tf.zeros([0], tf.string)),
        }
        for key, result in calls.items():
            outputs[f"{name}/{key}"] = result["embeddings"].numpy()
        for key, result in empty.items():
            outputs[f"{name}/empty/{key}"] = result["embeddings"].numpy()
        for bad in (b"not an image", b"", request["truncated_jpeg"].encode("latin-1")):
            try:
                signatures["encode_images"](image_bytes=tf.constant([bad]))
                report["errors"].append(None)
            except tf.errors.InvalidArgumentError as error:
                report["errors"].append(error.message)
    np.savez(sys.argv[3], **outputs)
    report["project_modules"] = sorted(
        name for name in sys.modules if name.split(".")[0] in ("dual_path", "data_prep", "experiments"))
    print("REPORT" + json.dumps(report))
""")


# TF1's session loader, as TF Serving loads a SavedModel: every signature through its
# SignatureDef's tensor names, on the inputs of LOAD_SCRIPT and on an empty batch.
SESSION_SCRIPT = textwrap.dedent("""
    import base64, json, sys
    import numpy as np
    import tensorflow as tf
    tf.compat.v1.disable_eager_execution()
    request = json.load(open(sys.argv[1]))
    arrays = np.load(sys.argv[2])
    feeds = {
        "image_bytes": [base64.b64decode(item) for item in request["image_bytes"]],
        "images": arrays["images"], "token_ids": arrays["token_ids"],
        "sentences": request["sentences"],
    }
    outputs, report = {}, {"errors": {}}
    for name, path in request["exports"].items():
        with tf.compat.v1.Session(graph=tf.Graph()) as session:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
            for key, signature in meta_graph.signature_def.items():
                if key.startswith("__"):
                    continue
                (input_key, tensor_info), = signature.inputs.items()
                output = signature.outputs["embeddings"].name
                value = feeds[input_key]
                outputs[f"{name}/{key}"] = session.run(output, {tensor_info.name: value})
                outputs[f"{name}/empty/{key}"] = session.run(output, {tensor_info.name: value[:0]})
            signature = meta_graph.signature_def["encode_images"]
            try:
                session.run(signature.outputs["embeddings"].name,
                            {signature.inputs["image_bytes"].name: [b"not an image"]})
            except tf.errors.InvalidArgumentError as error:
                report["errors"][name] = error.message
    np.savez(sys.argv[3], **outputs)
    print("REPORT" + json.dumps(report))
""")


def _split_jpeg_bytes(shard_dir: str) -> list[bytes]:
    """The split's encoded images as stored in its shards, in image-index order."""
    by_index = {}
    for serialized in tf.data.TFRecordDataset(shard_format.shard_files(shard_dir, SPLIT, shard_format.IMAGES)):
        example = shard_format.parse_image_example(serialized)
        by_index[int(example[shard_format.IMAGE_INDEX])] = example[shard_format.IMAGE_ENCODED].numpy()
    return [by_index[index] for index in range(len(by_index))]


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> dict:
    """{"plain": Export without flip/shift of the best checkpoint, "summed": with both, of the
    last one}, made from copies of vocab.txt and manifest.json that are deleted afterwards."""
    root = tmp_path_factory.mktemp("export")
    shard_copy = root / "shards"
    shard_copy.mkdir()
    for name in ("vocab.txt", "manifest.json"):
        shutil.copy(Path(trained_run.shard_dir, name), shard_copy / name)
    results = {
        "plain": export.export_run(trained_run.model_dir, shard_dir=str(shard_copy),
                                   flip_images=False, shift_texts=False,
                                   export_dir=str(root / "plain")),
        "summed": export.export_run(trained_run.model_dir, shard_dir=str(shard_copy),
                                    flip_images=True, shift_texts=True, checkpoint="last",
                                    export_dir=str(root / "summed")),
    }
    shutil.rmtree(shard_copy)
    return results


@pytest.fixture(scope="module")
def inputs(trained_run) -> dict:
    """The same inputs in the forms the signatures and the Keras encoders take."""
    config = run_layout.load_model_config(trained_run.model_dir)
    size, max_length = config.image_size, config.max_length
    jpeg = _split_jpeg_bytes(trained_run.shard_dir)
    evaluation_images = next(iter(input_pipeline.eval_image_dataset(
        trained_run.shard_dir, SPLIT, batch_size=len(jpeg), image_size=size)))["image"]
    png_pixels = np.random.default_rng(0).integers(0, 256, (20, 45, 3), dtype=np.uint8)
    png_image = tf.image.resize(png_pixels, [size, size], method="bilinear", antialias=True)
    token_ids = next(iter(input_pipeline.eval_caption_dataset(
        trained_run.shard_dir, SPLIT, batch_size=1000, max_length=max_length)))["token_ids"]
    vocabulary = text.Vocabulary.load(text.vocabulary_path(trained_run.shard_dir))
    sentence_ids = np.zeros([len(SENTENCES), max_length], np.int32)
    for row, sentence in enumerate(SENTENCES):
        ids = vocabulary.encode(text.tokenize(sentence), max_length, oov="drop")
        sentence_ids[row, :len(ids)] = ids
    # The inputs do test dropping and cutting: 2 of 7 words unknown, 60 words cut to L.
    assert np.count_nonzero(sentence_ids[2]) == 5 and np.count_nonzero(sentence_ids[3]) == max_length
    return {
        "image_bytes": jpeg + [_png_bytes(png_pixels)],
        "decoded_images": tf.concat([evaluation_images, png_image[tf.newaxis]], 0),
        "images": evaluation_images.numpy(),
        "token_ids": token_ids.numpy(),
        "sentence_ids": sentence_ids,
        "sentences": SENTENCES + NO_KNOWN_WORDS,
    }


def _run_without_the_project(script: str, exported: dict, inputs: dict, root: Path) -> tuple[dict, dict]:
    """(outputs, report) of `script` run on both exports, in a clean process under root."""
    jpeg = inputs["image_bytes"][0]
    request = {
        "exports": {name: result.export_dir for name, result in exported.items()},
        "image_bytes": [base64.b64encode(item).decode() for item in inputs["image_bytes"]],
        "sentences": inputs["sentences"],
        "truncated_jpeg": jpeg[:len(jpeg) // 2].decode("latin-1"),
    }
    (root / "request.json").write_text(json.dumps(request))
    np.savez(root / "arrays.npz", images=inputs["images"], token_ids=inputs["token_ids"])
    process = subprocess.run(
        [sys.executable, "-c", script, str(root / "request.json"), str(root / "arrays.npz"),
         str(root / "outputs.npz")], cwd=root, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.split("REPORT", 1)[1])
    with np.load(root / "outputs.npz") as outputs:
        return dict(outputs), report


@pytest.fixture(scope="module")
def loaded_outputs(exported, inputs, tmp_path_factory) -> tuple[dict, dict]:
    """(outputs, report) of LOAD_SCRIPT (TF2's loader) on both exports."""
    return _run_without_the_project(LOAD_SCRIPT, exported, inputs, tmp_path_factory.mktemp("load"))


@pytest.fixture(scope="module")
def session_outputs(exported, inputs, tmp_path_factory) -> tuple[dict, dict]:
    """(outputs, report) of SESSION_SCRIPT (TF1's session loader) on both exports."""
    return _run_without_the_project(SESSION_SCRIPT, exported, inputs, tmp_path_factory.mktemp("session"))


def _expected(trained_run, inputs, checkpoint, flip_images, shift_texts) -> dict:
    model, _ = run_layout.restore(trained_run.model_dir, which=checkpoint)
    return {
        "encode_images": embeddings.embed_images(model.image_encoder, inputs["decoded_images"], flip_images),
        "encode_image_tensors": embeddings.embed_images(model.image_encoder, inputs["images"], flip_images),
        "encode_token_ids": model.text_encoder(inputs["token_ids"], training=False),
        "encode_texts": embeddings.embed_texts(model.text_encoder, inputs["sentence_ids"], shift_texts),
    }


@pytest.mark.subprocess
def test_loads_with_tensorflow_alone_with_the_documented_signatures(loaded_outputs, exported):
    outputs, report = loaded_outputs
    assert report["project_modules"] == []
    for name in exported:
        assert report["signatures"][name] == {
            "encode_images": ["image_bytes"], "encode_image_tensors": ["images"],
            "encode_texts": ["sentences"], "encode_token_ids": ["token_ids"],
            "serving_default": ["sentences"]}
        np.testing.assert_array_equal(outputs[f"{name}/serving_default"], outputs[f"{name}/encode_texts"])
        np.testing.assert_array_equal(outputs[f"{name}/direct_encode_texts"],
                                      outputs[f"{name}/encode_texts"])


@pytest.mark.subprocess
@pytest.mark.parametrize("name, checkpoint, flip_images, shift_texts",
                         [("plain", "best", False, False), ("summed", "last", True, True)])
def test_embeddings_match_the_keras_encoders(loaded_outputs, exported, trained_run, inputs, name,
                                             checkpoint, flip_images, shift_texts):
    outputs, _ = loaded_outputs
    expected = _expected(trained_run, inputs, checkpoint, flip_images, shift_texts)
    for key, value in expected.items():
        got = outputs[f"{name}/{key}"][:len(value)]
        np.testing.assert_allclose(got, value.numpy(), atol=1e-5, err_msg=f"{name}/{key}")
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    info = exported[name].info
    assert info["checkpoint"].endswith(f"stage2/{'best/' if checkpoint == 'best' else ''}ckpt-5")
    assert (info["flip_images"], info["shift_texts"]) == (flip_images, shift_texts)
    assert json.loads(Path(exported[name].info_path).read_text()) == info


def test_export_info_and_vocabulary_asset(exported, trained_run):
    result = exported["plain"]
    config = run_layout.load_model_config(trained_run.model_dir)
    manifest = input_pipeline.load_manifest(trained_run.shard_dir)
    assert {key: result.info[key] for key in ("image_size", "max_length", "embedding_size",
                                              "vocab_size", "oov", "model_dir")} == {
        "image_size": config.image_size, "max_length": config.max_length,
        "embedding_size": config.head_dims[-1], "vocab_size": manifest["vocab_size"],
        "oov": manifest["oov"], "model_dir": trained_run.model_dir}
    assert (Path(result.export_dir, "assets", "vocab.txt").read_text()
            == Path(text.vocabulary_path(trained_run.shard_dir)).read_text())
    assert not Path(result.export_dir + ".tmp").exists()


SIGNATURE_NAMES = (*export.SIGNATURES, "serving_default")


@pytest.mark.subprocess
def test_tf1_session_loader_runs_every_signature_as_tf2_does(session_outputs, loaded_outputs, exported):
    """Regression: the session loader (TF Serving's) left the variables the signatures read
    uninitialised: "Could not find variable text_fc2_bn/gamma"."""
    session, report = session_outputs
    tf2, _ = loaded_outputs
    for name in exported:
        for key in SIGNATURE_NAMES:
            np.testing.assert_allclose(session[f"{name}/{key}"], tf2[f"{name}/{key}"], atol=1e-5,
                                       err_msg=f"{name}/{key}")
        assert "Unknown image file format" in report["errors"][name]


@pytest.mark.subprocess
@pytest.mark.parametrize("loader", ["tf2", "session"])
def test_every_signature_returns_float32_0_by_d_on_an_empty_batch(loader, loaded_outputs,
                                                                   session_outputs, exported):
    outputs, _ = loaded_outputs if loader == "tf2" else session_outputs
    for name, result in exported.items():
        for key in SIGNATURE_NAMES:
            empty = outputs[f"{name}/empty/{key}"]
            assert empty.shape == (0, result.info["embedding_size"]), f"{loader} {name}/{key}"
            assert empty.dtype == np.float32


def _saved_model_cli(*args: str, cwd: Path) -> None:
    process = subprocess.run(
        [str(Path(sys.executable).with_name("saved_model_cli")), "run", *args, "--tag_set", "serve"],
        cwd=cwd, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]


@pytest.mark.subprocess
def test_saved_model_cli_runs_encode_texts_and_encode_images(exported, inputs, loaded_outputs, tmp_path):
    """The README's serving command as written, and encode_images on JPEG bytes from a .npy."""
    tf2, _ = loaded_outputs
    export_dir = exported["plain"].export_dir
    _saved_model_cli("--dir", export_dir, "--signature_def", "encode_texts",
                     "--input_exprs", f"sentences={json.dumps(SENTENCES[:2])}",
                     "--outdir", str(tmp_path / "texts"), cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "texts" / "embeddings.npy"),
                               tf2["plain/encode_texts"][:2], atol=1e-5)
    jpeg = inputs["image_bytes"][:3]
    assert all(not item.endswith(b"\0") for item in jpeg)  # numpy's bytes_ keeps them whole
    np.save(tmp_path / "images.npy", np.array(jpeg, dtype=np.bytes_))
    _saved_model_cli("--dir", export_dir, "--signature_def", "encode_images",
                     "--inputs", f"image_bytes={tmp_path / 'images.npy'}",
                     "--outdir", str(tmp_path / "images"), cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "images" / "embeddings.npy"),
                               tf2["plain/encode_images"][:3], atol=1e-5)


def test_export_stores_each_variable_once(exported):
    """The checkpoint holds the variables the signatures read, not a second copy of each."""
    reader = tf.train.load_checkpoint(str(Path(exported["plain"].export_dir, "variables", "variables")))
    stored = [key for key in reader.get_variable_to_shape_map() if key.endswith("VARIABLE_VALUE")]
    loaded = tf.saved_model.load(exported["plain"].export_dir)
    assert len(stored) == len(loaded.encoder_variables)
    assert {variable.name for variable in loaded.encoder_variables} >= {
        "text_fc2_bn/gamma:0", "text_fc2_bn/moving_mean:0", "word_embedding/embeddings:0"}


@pytest.mark.subprocess
def test_sentences_without_known_words_embed_to_zeros(loaded_outputs):
    outputs, _ = loaded_outputs
    for name in ("plain", "summed"):
        texts = outputs[f"{name}/encode_texts"]
        assert not texts[len(SENTENCES):].any(), name
        assert texts[:len(SENTENCES)].any(axis=1).all(), name


@pytest.mark.subprocess
def test_bad_image_bytes_raise_invalid_argument_naming_the_cause(loaded_outputs):
    _, report = loaded_outputs
    not_an_image, empty, truncated = report["errors"][:3]
    assert "Unknown image file format" in not_an_image
    assert "Input is empty" in empty
    assert "Invalid JPEG data" in truncated


def test_oov_unk_maps_unknown_words_to_the_unk_id(trained_run):
    model, _ = run_layout.restore(trained_run.model_dir)
    module = export.EmbeddingModule(model, text.vocabulary_path(trained_run.shard_dir), oov="unk",
                                    flip_images=False, shift_texts=False)
    vocabulary = text.Vocabulary.load(text.vocabulary_path(trained_run.shard_dir))
    ids = np.zeros([2, model.config.max_length], np.int32)
    ids[0, :3] = [vocabulary.word_to_id("red"), text.UNK_ID, vocabulary.word_to_id("circle")]
    ids[1, :2] = text.UNK_ID
    got = module.encode_texts(tf.constant(["red zebra circle", "zebra giraffe"]))["embeddings"]
    np.testing.assert_allclose(got, model.text_encoder(ids, training=False), atol=1e-5)


def test_export_refuses_a_vocabulary_of_another_size_and_an_existing_folder(trained_run, tmp_path):
    shard_copy = tmp_path / "shards"
    shard_copy.mkdir()
    shutil.copy(Path(trained_run.shard_dir, "manifest.json"), shard_copy)
    vocabulary = Path(text.vocabulary_path(trained_run.shard_dir)).read_text()
    Path(text.vocabulary_path(str(shard_copy))).write_text(vocabulary + "extraword 1\n")
    with pytest.raises(ValueError, match=r"shards/vocab.txt: \d+ token ids, but the model was trained "
                                         r"with vocab_size \d+"):
        export.export_run(trained_run.model_dir, shard_dir=str(shard_copy), flip_images=False,
                          shift_texts=False, export_dir=str(tmp_path / "out"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken already exists"):
        export.export_run(trained_run.model_dir, shard_dir=trained_run.shard_dir,
                          flip_images=False, shift_texts=False, export_dir=str(tmp_path / "taken"))


def test_next_version_dir_counts_up_from_numeric_versions(tmp_path):
    assert export.next_version_dir(str(tmp_path)) == str(tmp_path / "export" / "1")
    for name in ("1", "7", "12.tmp", "notes"):
        (tmp_path / "export" / name).mkdir(parents=True)
    assert export.next_version_dir(str(tmp_path)) == str(tmp_path / "export" / "8")


@pytest.mark.subprocess
def test_command_takes_its_defaults_from_the_runs_config(trained_run, tmp_path):
    """shard_dir and the evaluation settings come from the run's config.json; a flag wins."""
    model_dir = tmp_path / "run"
    shutil.copytree(trained_run.model_dir, model_dir)
    run_layout.save_run_config(dataclasses.replace(
        run_layout.load_run_config(str(model_dir)), model_dir=str(model_dir),
        eval_flip_images=True, eval_shift_texts=False))
    process = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--model_dir={model_dir}",
         "--checkpoint=last", "--shift_texts"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    export_dir = model_dir / "export" / "1"
    assert f"SavedModel written to {export_dir}" in process.stdout
    assert f"export info written to {export_dir / 'export_info.json'}" in process.stdout
    info = json.loads((export_dir / "export_info.json").read_text())
    assert info["flip_images"] is True and info["shift_texts"] is True
    assert info["shard_dir"] == trained_run.shard_dir
    assert info["checkpoint"] == str(model_dir / "stage2" / "ckpt-5")
    assert (export_dir / "saved_model.pb").exists()
