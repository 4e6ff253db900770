"""The image path: which layers of a keras.applications backbone are its blocks, and that
training only the top leaves the rest, BN statistics included, as it was; each backbone's own
preprocessing of 0..255 RGB pixels, worked out by hand; small_cnn's blocks; BatchNorm
statistics re-estimated as the mean of the batch statistics, worked out with numpy. test_model.py
checks unknown backbones, weights files and MobileNet's preprocessing inside the model."""
import keras
import numpy as np
import pytest

from dual_path.image_path import (BackbonePreprocessing, block_of, build_image_backbone,
                                  first_trainable_layer, leaf_layers,
                                  reestimate_batch_norm_statistics, train_top_of_backbone)


@pytest.fixture(scope="module")
def mobilenet_v2() -> keras.Model:
    return build_image_backbone("MobileNetV2", weights=None, input_size=96)


def layer_named(model: keras.Model, name: str) -> keras.layers.Layer:
    return next(layer for layer in leaf_layers(model) if layer.name == name)


@pytest.mark.parametrize("name, block", [
    ("conv4_block6_2_conv", "conv4_block6"), ("conv1_conv", None), ("avg_pool", None),  # ResNet
    ("block_16_project_BN", "block_16"), ("expanded_conv_depthwise", "expanded_conv"),
    ("Conv_1", None), ("Conv1", None),  # MobileNetV2
    ("block6a_se_excite", "block6a"), ("top_conv", None),  # EfficientNet
    ("conv_dw_13_bn", "13"), ("conv_pw_13", "13"), ("conv_pad_12", "12"), ("conv1", None),  # MobileNet
    ("small_cnn_bn3", "3"), ("small_cnn_pool", None),
])
def test_block_of_names_the_block_of_each_applications_layers(name, block):
    assert block_of(name) == block


def test_mobilenet_v2_has_17_blocks_and_its_last_7_start_at_block_10(mobilenet_v2):
    layers = leaf_layers(mobilenet_v2)
    blocks = list(dict.fromkeys(filter(None, (block_of(layer.name) for layer in layers))))
    assert blocks == ["expanded_conv"] + [f"block_{n}" for n in range(1, 17)]
    first = first_trainable_layer(mobilenet_v2, blocks=7)
    assert layers[first].name == "block_10_expand"
    assert first_trainable_layer(mobilenet_v2, from_layer="block_10_expand") == first
    assert first_trainable_layer(mobilenet_v2) == 0
    assert first_trainable_layer(mobilenet_v2, blocks=0) == len(layers)


def test_training_the_top_keeps_the_frozen_layers_weights_and_bn_statistics(mobilenet_v2):
    trained = train_top_of_backbone(mobilenet_v2, blocks=2)
    assert trained[0] == "block_15_expand" and {"Conv_1", "Conv_1_bn", "out_relu"} <= set(trained)
    frozen_bn = next(layer for layer in leaf_layers(mobilenet_v2) if layer.name == "block_14_project_BN")
    top_bn = next(layer for layer in leaf_layers(mobilenet_v2) if layer.name == "Conv_1_bn")
    frozen_before = [weight.numpy().copy() for weight in frozen_bn.weights]
    top_before = top_bn.moving_mean.numpy().copy()
    images = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    mobilenet_v2(images, training=True)
    for before, weight in zip(frozen_before, frozen_bn.weights):
        np.testing.assert_array_equal(before, weight.numpy())
    assert not np.array_equal(top_before, top_bn.moving_mean.numpy())  # a trained BN updates
    assert {variable.path.split("/")[0] for variable in mobilenet_v2.trainable_variables} <= set(trained)


def test_freezing_the_tops_batch_norm_keeps_training_mode_at_the_inference_features(mobilenet_v2):
    """With freeze_batch_norm the top's convs train and its BN layers neither train nor use batch
    statistics: the features the cached ones of stage I came from. Without it they differ."""
    images = np.random.default_rng(1).uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    trained = train_top_of_backbone(mobilenet_v2, blocks=2, freeze_batch_norm=True)
    assert "block_15_expand" in trained and "Conv_1" in trained
    assert not any(name.endswith(("_BN", "_bn")) for name in trained)
    top_bn = layer_named(mobilenet_v2, "Conv_1_bn")
    before = top_bn.moving_mean.numpy().copy()
    np.testing.assert_allclose(mobilenet_v2(images, training=True),
                               mobilenet_v2(images, training=False), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(before, top_bn.moving_mean.numpy())
    assert {variable.path.split("/")[0] for variable in mobilenet_v2.trainable_variables} == {
        name for name in trained if layer_named(mobilenet_v2, name).weights}
    train_top_of_backbone(mobilenet_v2, blocks=2)
    assert not np.allclose(mobilenet_v2(images, training=True), mobilenet_v2(images, training=False))


def test_a_second_call_sets_every_layer_again(mobilenet_v2):
    """Regression: Keras does not pass a model's `trainable = True` on to the layers of a nested
    model frozen one by one, so widening the trained top left it at the first call's size."""
    narrow = len(train_top_of_backbone(mobilenet_v2, blocks=2))
    wide = train_top_of_backbone(mobilenet_v2, blocks=7)
    assert narrow < len(wide)
    assert sum(layer.trainable for layer in leaf_layers(mobilenet_v2)) == len(wide)
    everything = train_top_of_backbone(mobilenet_v2)
    assert len(everything) == len(leaf_layers(mobilenet_v2))
    assert len(mobilenet_v2.trainable_variables) == 156


@pytest.mark.parametrize("options, message", [
    (dict(from_layer="conv5_block3_out"), "has no layer 'conv5_block3_out'; its layers: "
                                          "preprocess_input, Conv1, bn_Conv1"),
    (dict(blocks=18), r"has 17 blocks \(expanded_conv, block_1, .*block_16\), asked to train the last 18"),
    (dict(blocks=2, from_layer="Conv_1"), "not both"),
])
def test_a_top_the_backbone_lacks_is_a_clear_error(mobilenet_v2, options, message):
    with pytest.raises(ValueError, match=message):
        first_trainable_layer(mobilenet_v2, **options)


@pytest.fixture
def float16_policy():
    """The mixed_float16 global policy for one test, float32 again afterwards."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name, expected", [
    # caffe: RGB -> BGR, minus the ImageNet mean (103.939, 116.779, 123.68), no scaling.
    ("ResNet50", [10 - 103.939, 0 - 116.779, 255 - 123.68]),
    # tf: x / 127.5 - 1.
    ("MobileNetV2", [1.0, -1.0, 10 / 127.5 - 1]),
    # torch: (x / 255 - mean) / std, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
    ("DenseNet121", [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (10 / 255 - 0.406) / 0.225]),
    # EfficientNet rescales inside the network: its preprocess_input leaves pixels as they are.
    ("EfficientNetB0", [255.0, 0.0, 10.0]),
])
def test_preprocessing_is_each_backbones_own_in_float32_under_mixed_precision(name, expected,
                                                                             float16_policy):
    """One RGB pixel (255, 0, 10) through BackbonePreprocessing, under the mixed_float16 policy:
    the backbone's own preprocess_input, worked out by hand, computed and returned in float32."""
    pixel = np.array([[[[255.0, 0.0, 10.0]]]], np.float32)
    layer = BackbonePreprocessing(name)
    output = layer(pixel)
    assert layer.compute_dtype == "float32" and output.dtype == "float32"
    np.testing.assert_allclose(np.asarray(output)[0, 0, 0], expected, rtol=1e-5)


def test_small_cnn_halves_the_side_per_block_from_pixels_scaled_to_plus_minus_1():
    """small_cnn on 32x32 images, widths (8, 16, 24): stride-2 blocks give 16, 8 and 4 pixels
    a side, then the average pool gives 24 features; pixels 0, 127.5, 255 enter as -1, 0, 1."""
    backbone = build_image_backbone("small_cnn", weights=None, input_size=32,
                                    small_cnn_widths=(8, 16, 24))
    sides = [tuple(backbone.get_layer(f"small_cnn_relu{block}").output.shape[1:])
             for block in (1, 2, 3)]
    assert sides == [(16, 16, 8), (8, 8, 16), (4, 4, 24)]
    assert tuple(backbone.output.shape) == (None, 24)
    rescale = backbone.get_layer("small_cnn_rescale")
    np.testing.assert_allclose(rescale(np.array([0.0, 127.5, 255.0], np.float32)), [-1.0, 0.0, 1.0])


@pytest.mark.parametrize("options, message", [
    (dict(weights="imagenet"), "the small_cnn backbone has no ImageNet weights"),
    (dict(weights=None, alpha=0.5), "alpha=0.5 given, but image backbone 'small_cnn' has no width"),
])
def test_small_cnn_has_no_imagenet_weights_and_no_width_multiplier(options, message):
    with pytest.raises(ValueError, match=message):
        build_image_backbone("small_cnn", input_size=32, **options)


def _small_cnn_and_batches(count: int) -> tuple[keras.Model, list[np.ndarray]]:
    """A frozen random small_cnn on 32x32 images and `count` batches of 8 images whose pixels
    are far from ImageNet-like (bright, low contrast), so their statistics differ from 0 / 1."""
    backbone = build_image_backbone("small_cnn", weights=None, input_size=32,
                                    small_cnn_widths=(8, 16))
    backbone.trainable = False
    rng = np.random.default_rng(3)
    return backbone, [rng.uniform(180, 255, (8, 32, 32, 3)).astype("float32") for _ in range(count)]


def test_reestimated_statistics_are_the_mean_of_each_batchs_statistics():
    """The first BN's moving mean and variance become the mean over batches of its input's
    per-batch mean and (biased) variance over batch and pixels; the layers keep their trainable
    flag and momentum, and no other weight changes. In inference mode the backbone then gives
    about the features of training mode (batch statistics) on a batch of all the images."""
    backbone, batches = _small_cnn_and_batches(4)
    conv1 = keras.Model(backbone.input, backbone.get_layer("small_cnn_conv1").output)
    outputs = [np.asarray(conv1(images), np.float64) for images in batches]
    expected_mean = np.mean([output.mean(axis=(0, 1, 2)) for output in outputs], axis=0)
    expected_variance = np.mean([output.var(axis=(0, 1, 2)) for output in outputs], axis=0)
    batch_norms = [layer for layer in leaf_layers(backbone)
                   if isinstance(layer, keras.layers.BatchNormalization)]
    others = {weight.path: weight.numpy().copy() for weight in backbone.weights
              if "moving_" not in weight.path}
    everything = np.concatenate(batches)
    before = np.abs(backbone(everything, training=False) - _training_mode(backbone, everything)).mean()

    assert reestimate_batch_norm_statistics(backbone, iter(batches)) == 4

    first = backbone.get_layer("small_cnn_bn1")
    np.testing.assert_allclose(first.moving_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), expected_variance, rtol=1e-4)
    assert [(layer.trainable, layer.momentum) for layer in batch_norms] == [(False, 0.99)] * 2
    for weight in backbone.weights:
        if weight.path in others:
            np.testing.assert_array_equal(weight.numpy(), others[weight.path])
    after = np.abs(backbone(everything, training=False) - _training_mode(backbone, everything)).mean()
    assert after < 0.1 * before


def test_reestimating_the_top_leaves_the_layers_below_it_as_they_were():
    """from_layer at small_cnn's block 2: its BN takes the mean of its batch statistics, its
    input normalised by block 1's moving statistics, which stay as they were."""
    backbone, batches = _small_cnn_and_batches(3)
    conv2 = keras.Model(backbone.input, backbone.get_layer("small_cnn_conv2").output)
    outputs = [np.asarray(conv2(images, training=False), np.float64) for images in batches]
    first, second = backbone.get_layer("small_cnn_bn1"), backbone.get_layer("small_cnn_bn2")
    first_before = [weight.numpy().copy() for weight in first.weights]
    from_layer = first_trainable_layer(backbone, blocks=1)
    assert leaf_layers(backbone)[from_layer].name == "small_cnn_conv2"

    assert reestimate_batch_norm_statistics(backbone, batches, from_layer=from_layer) == 3

    for before, weight in zip(first_before, first.weights):
        np.testing.assert_array_equal(before, weight.numpy())
    np.testing.assert_allclose(second.moving_mean.numpy(),
                               np.mean([output.mean(axis=(0, 1, 2)) for output in outputs], axis=0),
                               rtol=1e-4, atol=1e-5)
    assert (first.trainable, first.momentum, second.trainable) == (False, 0.99, False)


def _training_mode(backbone: keras.Model, images: np.ndarray) -> np.ndarray:
    """backbone's training-mode (batch statistics) features of images, its BN layers as they were."""
    batch_norms = [layer for layer in leaf_layers(backbone)
                   if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.trainable, [weight.numpy() for weight in layer.weights]) for layer in batch_norms]
    for layer in batch_norms:
        layer.trainable = True
    features = np.asarray(backbone(images, training=True))
    for layer, (trainable, weights) in zip(batch_norms, saved):
        layer.trainable = trainable
        layer.set_weights(weights)
    return features


def _fail_after(batches: list, count: int):
    yield from batches[:count]
    raise OSError("image shard unreadable")


@pytest.mark.parametrize("batches, error", [
    ([], "no images to re-estimate the BatchNorm statistics of 'image_backbone' on"),
    (None, "image shard unreadable"),
])
def test_a_failed_reestimation_leaves_the_statistics_as_they_were(batches, error):
    """Nothing to average, or a reader failing after two batches: the error comes through and
    the moving statistics, trainable flags and momentum are the backbone's before the call."""
    backbone, images = _small_cnn_and_batches(3)
    statistics = {weight.path: weight.numpy().copy() for weight in backbone.weights}
    with pytest.raises((ValueError, OSError), match=error):
        reestimate_batch_norm_statistics(backbone, _fail_after(images, 2) if batches is None else batches)
    for weight in backbone.weights:
        np.testing.assert_array_equal(weight.numpy(), statistics[weight.path])
    assert all(not layer.trainable and layer.momentum == 0.99 for layer in leaf_layers(backbone)
               if isinstance(layer, keras.layers.BatchNormalization))
