"""Tests of dual_path.model, image_path and text_path on tiny configurations, on CPU."""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from data_prep import shared_data
from dual_path.image_path import BackbonePreprocessing, build_image_backbone
from dual_path.model import SHARED_CLASSIFIER, DualPathConfig, build_dual_path
from dual_path.text import PAD_ID
from dual_path.text_path import WORD_EMBEDDING, build_text_path

from conftest import tiny_model

MOBILENET_WEIGHTS = shared_data.MOBILENET_0_25_WEIGHTS
MOBILENET_V2_WEIGHTS = shared_data.MOBILENET_V2_WEIGHTS

BATCH = 4
IMAGE_SIZE = 32
MAX_LENGTH = 8
VOCAB_SIZE = 50
NUM_CLASSES = 10
HEAD_DIM = 24


def tiny_config(**overrides) -> DualPathConfig:
    """The tiny model at this file's vocabulary, classes and caption length, with heads of
    HEAD_DIM, a width no other layer has, so that the shape checks see the head's."""
    return tiny_model(**{"vocab_size": VOCAB_SIZE, "num_classes": NUM_CLASSES,
                         "max_length": MAX_LENGTH, "head_dims": (HEAD_DIM, HEAD_DIM), **overrides})


def batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(2, VOCAB_SIZE, size=(BATCH, MAX_LENGTH)).astype("int32")
    token_ids[:, 5:] = PAD_ID
    return {
        "image": rng.uniform(0, 255, size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32"),
        "token_ids": token_ids,
    }


def classification_loss(logits, labels):
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def gradients(model, inputs, output_names, variables):
    """Gradients of the summed classification losses of the named logits outputs."""
    labels = np.arange(BATCH) % NUM_CLASSES
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        loss = sum(classification_loss(outputs[name], labels) for name in output_names)
    return tape.gradient(loss, variables)


@pytest.fixture
def float32_policy_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_outputs_have_the_documented_shapes_dtypes_and_unit_norm():
    dual_path = build_dual_path(tiny_config())
    outputs = dual_path.training_model(batch(), training=False)
    assert set(outputs) == {"image_logits", "text_logits", "image_embedding", "text_embedding"}
    for name in ("image_logits", "text_logits"):
        assert outputs[name].shape == (BATCH, NUM_CLASSES) and outputs[name].dtype == tf.float32
    for name in ("image_embedding", "text_embedding"):
        assert outputs[name].shape == (BATCH, HEAD_DIM) and outputs[name].dtype == tf.float32
        np.testing.assert_allclose(np.linalg.norm(outputs[name], axis=1), 1.0, rtol=1e-5)


def test_encoders_share_the_training_models_weights():
    dual_path = build_dual_path(tiny_config())
    inputs = batch()
    outputs = dual_path.training_model(inputs, training=False)
    np.testing.assert_allclose(dual_path.image_encoder(inputs["image"]), outputs["image_embedding"], rtol=1e-5)
    np.testing.assert_allclose(dual_path.text_encoder(inputs["token_ids"]), outputs["text_embedding"], rtol=1e-5)
    kernel = dual_path.training_model.get_layer("text_fc1").kernel
    kernel.assign(kernel * 2.0 + 0.1)
    np.testing.assert_allclose(
        dual_path.text_encoder(inputs["token_ids"]),
        dual_path.training_model(inputs, training=False)["text_embedding"], rtol=1e-5)
    assert not np.allclose(dual_path.text_encoder(inputs["token_ids"]), outputs["text_embedding"])


def test_one_shared_classifier_kernel_serves_both_paths():
    shared = build_dual_path(tiny_config())
    separate = build_dual_path(tiny_config(share_classifier=False))
    model = shared.training_model
    assert shared.image_classifier is shared.text_classifier
    assert shared.image_classifier is model.get_layer(SHARED_CLASSIFIER)
    classifier_variables = [v for v in model.weights if v.path.startswith(SHARED_CLASSIFIER)]
    assert [v.path for v in classifier_variables] == [f"{SHARED_CLASSIFIER}/kernel"]
    kernel = shared.image_classifier.kernel
    assert tuple(kernel.shape) == (HEAD_DIM, NUM_CLASSES)
    assert len(model.trainable_variables) == len(separate.training_model.trainable_variables) - 1

    inputs = batch()
    for output_name in ("image_logits", "text_logits"):
        (gradient,) = gradients(model, inputs, [output_name], [kernel])
        assert gradient is not None and np.abs(gradient).max() > 0

    before = model(inputs, training=False)
    kernel.assign(kernel + 1.0)
    after = model(inputs, training=False)
    for output_name in ("image_logits", "text_logits"):
        assert not np.allclose(before[output_name], after[output_name])


def test_separate_classifiers_each_see_only_their_own_path():
    dual_path = build_dual_path(tiny_config(share_classifier=False, classifier_bias=True))
    model = dual_path.training_model
    image_classifier, text_classifier = dual_path.image_classifier, dual_path.text_classifier
    assert image_classifier is not text_classifier
    assert image_classifier.use_bias and text_classifier.use_bias
    with pytest.raises(ValueError):
        model.get_layer(SHARED_CLASSIFIER)
    image_gradient, text_gradient = gradients(
        model, batch(), ["image_logits"], [image_classifier.kernel, text_classifier.kernel])
    assert np.abs(image_gradient).max() > 0
    assert text_gradient is None


def test_word_embedding_starts_from_the_given_matrix_and_has_its_own_multiplier():
    config = tiny_config()
    embedding_init = np.random.default_rng(1).normal(size=(VOCAB_SIZE, 16)).astype("float32")
    embedding_init[PAD_ID] = 0.0
    dual_path = build_dual_path(config, embedding_init=embedding_init)
    embeddings = dual_path.text_cnn.get_layer(WORD_EMBEDDING).embeddings
    np.testing.assert_array_equal(embeddings.numpy(), embedding_init)

    multipliers = dual_path.lr_multipliers()
    assert multipliers.pop(embeddings.path) == config.embedding_lr_multiplier == 1e-3
    assert set(multipliers.values()) == {1.0}
    assert len(multipliers) == len(dual_path.training_model.trainable_variables) - 1


def test_random_word_embedding_keeps_the_padding_row_zero():
    text_cnn = build_text_path(VOCAB_SIZE, MAX_LENGTH, embedding_dim=16, blocks=(1, 1), widths=(32, 64))
    embeddings = text_cnn.get_layer(WORD_EMBEDDING).embeddings.numpy()
    assert not embeddings[PAD_ID].any()
    assert np.abs(embeddings[PAD_ID + 1:]).min(axis=1).max() > 0


def test_embedding_init_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"embedding_init has shape \(50, 300\).*\(50, 16\)"):
        build_dual_path(tiny_config(), embedding_init=np.zeros((VOCAB_SIZE, 300), "float32"))


def test_text_stages_halve_the_positions_after_the_first():
    text_cnn = build_text_path(VOCAB_SIZE, MAX_LENGTH, embedding_dim=16, blocks=(2, 1, 1),
                               widths=(16, 32, 64))
    stage_outputs = {layer.name: tuple(layer.output.shape) for layer in text_cnn.layers
                     if layer.name.endswith("_out")}
    assert stage_outputs == {
        "text_stage1_block1_out": (None, 8, 16), "text_stage1_block2_out": (None, 8, 16),
        "text_stage2_block1_out": (None, 4, 32), "text_stage3_block1_out": (None, 2, 64),
    }
    assert text_cnn.get_layer("text_stage1_block2_width2_conv").kernel.shape == (2, 4, 4)
    assert tuple(text_cnn.output.shape) == (None, 64)


def test_embedding_point_selects_where_the_embedding_is_taken():
    inputs = batch()
    after_bn = build_dual_path(tiny_config(embedding_point="bn")).image_encoder(inputs["image"])
    after_relu = build_dual_path(tiny_config(embedding_point="relu")).image_encoder(inputs["image"])
    assert np.asarray(after_bn).min() < 0
    assert np.asarray(after_relu).min() >= 0
    with pytest.raises(ValueError, match="embedding_point"):
        tiny_config(embedding_point="fc")


def test_frozen_backbone_keeps_weights_and_bn_statistics_while_heads_train():
    dual_path = build_dual_path(tiny_config())
    model = dual_path.training_model
    dual_path.backbone.trainable = False
    backbone_before = [v.numpy() for v in dual_path.backbone.weights]
    head_bn = model.get_layer("image_fc1_bn")
    head_before = [head_bn.moving_mean.numpy(), model.get_layer("image_fc1").kernel.numpy()]
    backbone_ids = {id(v) for v in dual_path.backbone.weights}
    assert not backbone_ids & {id(v) for v in model.trainable_variables}

    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    variables = model.trainable_variables
    optimizer.apply(gradients(model, batch(), ["image_logits", "text_logits"], variables), variables)

    for before, variable in zip(backbone_before, dual_path.backbone.weights):
        np.testing.assert_array_equal(variable.numpy(), before, err_msg=variable.path)
    assert not np.allclose(head_bn.moving_mean.numpy(), head_before[0])
    assert not np.allclose(model.get_layer("image_fc1").kernel.numpy(), head_before[1])


def test_unfrozen_backbone_updates_its_bn_statistics():
    dual_path = build_dual_path(tiny_config())
    moving_mean = dual_path.backbone.get_layer("small_cnn_bn1").moving_mean
    before = moving_mean.numpy()
    dual_path.training_model(batch(), training=True)
    assert not np.allclose(moving_mean.numpy(), before)


def test_mixed_float16_policy_still_gives_float32_outputs(float32_policy_after):
    keras.mixed_precision.set_global_policy("mixed_float16")
    dual_path = build_dual_path(tiny_config())
    assert dual_path.training_model.get_layer("image_fc1").compute_dtype == "float16"
    outputs = dual_path.training_model(batch(), training=True)
    for name, value in outputs.items():
        assert value.dtype == tf.float32, name
    np.testing.assert_allclose(np.linalg.norm(outputs["text_embedding"], axis=1), 1.0, rtol=1e-3)


def test_unknown_backbone_and_misplaced_alpha_are_rejected():
    with pytest.raises(ValueError, match="unknown image backbone 'ResNet49'"):
        build_image_backbone("ResNet49", weights=None)
    with pytest.raises(ValueError, match="'ResNet50' has no width multiplier"):
        build_image_backbone("ResNet50", weights=None, alpha=0.25)
    with pytest.raises(FileNotFoundError, match="no_such_weights.h5"):
        build_image_backbone("MobileNet", weights="/nonexistent/no_such_weights.h5", alpha=0.25)


def test_small_cnn_weights_file_round_trips(tmp_path):
    saved = build_image_backbone("small_cnn", weights=None, input_size=IMAGE_SIZE, small_cnn_widths=(8, 16))
    weights_file = str(tmp_path / "small_cnn.weights.h5")
    saved.save_weights(weights_file)
    loaded = build_image_backbone("small_cnn", weights=weights_file, input_size=IMAGE_SIZE,
                                  small_cnn_widths=(8, 16))
    images = batch()["image"]
    np.testing.assert_allclose(loaded(images), saved(images), rtol=1e-6)


def test_mobilenet_loads_the_shared_imagenet_weights_and_preprocesses_inside():
    if not MOBILENET_WEIGHTS.is_file():
        pytest.skip(f"{MOBILENET_WEIGHTS} is absent")
    backbone = build_image_backbone("MobileNet", weights=str(MOBILENET_WEIGHTS), input_size=64, alpha=0.25)
    assert backbone.count_params() == 218_544
    with h5py.File(MOBILENET_WEIGHTS, "r") as weights_file:
        first_kernel = np.asarray(weights_file["conv1"]["conv1"]["kernel:0"])
    loaded_kernel = next(v for v in backbone.weights if v.path == "conv1/kernel")
    np.testing.assert_array_equal(loaded_kernel.numpy(), first_kernel)

    pixels = batch()["image"][:2]
    pixels = np.asarray(tf.image.resize(pixels, (64, 64)))
    scaled = pixels / 127.5 - 1.0
    network = backbone.layers[-1]
    np.testing.assert_allclose(backbone(pixels), network(scaled), rtol=1e-4, atol=1e-5)


def _h5_arrays(path) -> list[np.ndarray]:
    arrays = []
    with h5py.File(path, "r") as weights_file:
        weights_file.visititems(lambda name, item: arrays.append(np.asarray(item))
                                if isinstance(item, h5py.Dataset) else None)
    return arrays


def _fingerprints(arrays) -> list[tuple]:
    return sorted((array.shape, np.asarray(array, np.float32).tobytes()) for array in arrays)


def test_mobilenet_v2_loads_every_array_of_a_keras3_weights_file():
    if not MOBILENET_V2_WEIGHTS.is_file():
        pytest.skip(f"{MOBILENET_V2_WEIGHTS} is absent")
    backbone = build_image_backbone("MobileNetV2", weights=str(MOBILENET_V2_WEIGHTS), input_size=96)
    assert backbone.count_params() == 2_257_984 and tuple(backbone.output.shape) == (None, 1280)
    file_arrays = _h5_arrays(MOBILENET_V2_WEIGHTS)
    assert len(file_arrays) == len(backbone.weights) == 260
    # The backbone's weights are the file's arrays, each once (and not ImageNet's or random).
    assert _fingerprints(v.numpy() for v in backbone.weights) == _fingerprints(file_arrays)
    random_init = build_image_backbone("MobileNetV2", weights=None, input_size=96)
    assert _fingerprints(v.numpy() for v in random_init.weights) != _fingerprints(file_arrays)


def test_resnet50_builds_with_random_weights():
    backbone = build_image_backbone("ResNet50", weights=None, input_size=64)
    assert tuple(backbone.output.shape) == (None, 2048)
    assert backbone.count_params() == 23_587_712


def test_keras_file_round_trip_keeps_the_preprocessing_and_the_outputs(tmp_path):
    dual_path = build_dual_path(tiny_config(backbone="MobileNet", alpha=0.25))
    assert isinstance(dual_path.backbone.get_layer("preprocess_input"), BackbonePreprocessing)
    model_file = str(tmp_path / "dual_path.keras")
    dual_path.training_model.save(model_file)
    restored = keras.models.load_model(model_file)
    inputs = batch()
    expected = dual_path.training_model(inputs, training=False)
    actual = restored(inputs, training=False)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
