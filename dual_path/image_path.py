"""The image path's CNN backbone: RGB pixels -> one pooled feature vector per image.

Any `keras.applications` backbone can be named (ResNet50, the paper's choice, ResNet101,
MobileNet with `alpha`, MobileNetV2, EfficientNetB0, ...). It is built with
`include_top=False, pooling="avg"` (pool5) and with the backbone's own `preprocess_input`
inside the model, so that every backbone, and every model exported from it, takes the same
input: float32 RGB pixels in 0..255. "small_cnn" is a few conv-BN-ReLU blocks for the small
synthetic dataset, where training has to take minutes on a CPU.

The head that follows the backbone (fc -> BN -> ReLU -> fc -> BN -> ReLU -> Dropout) is the
same for both paths and is built in `dual_path.model`.

`train_top_of_backbone` makes only the top of a backbone trainable (the last N blocks, or from a
named layer on), as big_vision's freeze patterns do with parameter names: the layers below stay
frozen, BatchNormalization statistics included. `reestimate_batch_norm_statistics` sets a
backbone's BN moving statistics, or its top's, to their mean batch statistics over given images
(precise BN at stage II's end; the training views' statistics before stage I).
"""
import os
import re
from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

SMALL_CNN = "small_cnn"
IMAGENET = "imagenet"


def application_names() -> list[str]:
    """Names of the keras.applications backbones build_image_backbone accepts."""
    return sorted(name for name in dir(keras.applications) if name[:1].isupper())


def _application_module(name: str):
    """The public keras.applications module of a backbone: resnet for ResNet50, and so on."""
    if name not in application_names():
        raise ValueError(
            f"unknown image backbone {name!r}: expected {SMALL_CNN!r} or one of "
            f"{', '.join(application_names())}"
        )
    constructor = getattr(keras.applications, name)
    return getattr(keras.applications, constructor.__module__.rsplit(".", 1)[-1])


@keras.saving.register_keras_serializable(package="dual_path")
class BackbonePreprocessing(keras.layers.Layer):
    """The named backbone's own `preprocess_input`, as a layer.

    Input: float32 [B, S, S, 3], RGB in 0..255. Output: float32 [B, S, S, 3] in the range and
    channel order the backbone was trained with (caffe: BGR minus the ImageNet mean; tf: -1..1;
    torch: ImageNet mean and std; or unchanged where the backbone rescales by itself).
    Computed in float32 whatever the global dtype policy, so that 0..255 keeps its precision.
    """

    def __init__(self, backbone_name: str, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.backbone_name = backbone_name
        self._preprocess_input = _application_module(backbone_name).preprocess_input

    def call(self, images):
        return self._preprocess_input(images)

    def get_config(self):
        return {**super().get_config(), "backbone_name": self.backbone_name}


def _small_cnn(images, widths: Sequence[int]):
    """float32 [B, S, S, 3] in 0..255 -> [B, widths[-1]]: stride-2 3x3 conv-BN-ReLU blocks, avg pool."""
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="small_cnn_rescale")(images)
    for index, width in enumerate(widths, start=1):
        x = keras.layers.Conv2D(
            width, 3, strides=2, padding="same", use_bias=False, name=f"small_cnn_conv{index}"
        )(x)
        x = keras.layers.BatchNormalization(name=f"small_cnn_bn{index}")(x)
        x = keras.layers.ReLU(name=f"small_cnn_relu{index}")(x)
    return keras.layers.GlobalAveragePooling2D(name="small_cnn_pool")(x)


def _application(images, name: str, weights: str | None, input_size: int, alpha: float | None):
    """float32 [B, S, S, 3] in 0..255 -> [B, F]: preprocess_input, then the pooled application."""
    preprocessing = BackbonePreprocessing(name, name="preprocess_input")
    constructor = getattr(keras.applications, name)
    options = dict(include_top=False, weights=weights, input_shape=(input_size, input_size, 3),
                   pooling="avg")
    if alpha is not None:
        if name not in ("MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large"):
            raise ValueError(f"alpha={alpha} given, but image backbone {name!r} has no width multiplier")
        options["alpha"] = alpha
    network = constructor(**options)
    return network(preprocessing(images))


def build_image_backbone(
    name: str = "ResNet50",
    weights: str | None = IMAGENET,
    input_size: int = 224,
    alpha: float | None = None,
    small_cnn_widths: Sequence[int] = (32, 64, 128, 256),
) -> keras.Model:
    """The image CNN up to its global average pool (pool5).

    Args:
      name: a keras.applications constructor name (see `application_names()`) or "small_cnn".
      weights: "imagenet" (downloaded by Keras, applications only), None (random), or the path
        of a weights file saved from the same architecture (.h5 or .weights.h5), e.g.
        ../shared/weights/mobilenet_2_5_224_tf_no_top.h5 with MobileNet alpha=0.25.
      input_size: S, the side of the square input image in pixels.
      alpha: the width multiplier of MobileNet, MobileNetV2 and MobileNetV3; None for the default.
      small_cnn_widths: output channels of the small_cnn blocks, one stride-2 block each.

    Returns:
      keras.Model "image_backbone": float32 [B, S, S, 3] RGB in 0..255 -> [B, F] pooled features
      (F = 2048 for ResNet50, widths[-1] for small_cnn). Setting its `trainable` to False freezes
      its weights and makes its BatchNormalization layers use, and keep, their moving statistics.
    """
    if weights not in (None, IMAGENET) and not os.path.isfile(weights):
        raise FileNotFoundError(f"image backbone weights file {weights!r} does not exist")
    images = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="image")
    if name == SMALL_CNN:
        if weights == IMAGENET:
            raise ValueError("the small_cnn backbone has no ImageNet weights: use weights=None or a file")
        if alpha is not None:
            raise ValueError(f"alpha={alpha} given, but image backbone 'small_cnn' has no width multiplier")
        features = _small_cnn(images, small_cnn_widths)
    else:
        features = _application(images, name, weights, input_size, alpha)
    backbone = keras.Model(images, features, name="image_backbone")
    if name == SMALL_CNN and weights is not None:
        backbone.load_weights(weights)
    return backbone


# A keras.applications layer name -> the block it belongs to. ResNet: conv4_block6_2_conv;
# MobileNetV2: block_16_project (its block 0 is "expanded_conv_*"); EfficientNet: block6a_se;
# MobileNet v1: conv_dw_13 / conv_pw_13 / conv_pad_12; small_cnn: small_cnn_conv3 / _bn3 / _relu3.
_BLOCK_PATTERNS = (
    re.compile(r"^(conv\d_block\d+)_"),
    re.compile(r"^(block_\d+)_"),
    re.compile(r"^(expanded_conv)_"),
    re.compile(r"^(block\d+[a-z])_"),
    re.compile(r"^conv_(?:dw|pw|pad)_(\d+)"),
    re.compile(r"^small_cnn_[a-z]+(\d+)$"),
)


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of model in graph order, nested models (an application) replaced by theirs."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.extend(leaf_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            layers.append(layer)
    return layers


def block_of(layer_name: str) -> str | None:
    """The block a backbone layer belongs to ("block_16", "conv5_block3", "13"), None outside blocks."""
    for pattern in _BLOCK_PATTERNS:
        match = pattern.match(layer_name)
        if match:
            return match.group(1)
    return None


def first_trainable_layer(backbone: keras.Model, *, from_layer: str | None = None,
                          blocks: int | None = None) -> int:
    """Where the trained top of backbone starts, as an index into `leaf_layers(backbone)`: the
    layer `from_layer`, or the first layer of its last `blocks` blocks (`block_of`; 0 blocks:
    past the last layer, nothing trains); 0 (all of it) when neither is given. Changes nothing.

    Raises:
      ValueError: both given, a layer the backbone does not have, or more blocks than it has
        (the message lists what it has).
    """
    layers = leaf_layers(backbone)
    if from_layer is not None and blocks is not None:
        raise ValueError(f"train the top of the backbone from a layer ({from_layer!r}) or its "
                         f"last blocks ({blocks}), not both")
    if from_layer is not None:
        names = [layer.name for layer in layers]
        if from_layer not in names:
            raise ValueError(f"the backbone {backbone.name!r} has no layer {from_layer!r}; its "
                             f"layers: {', '.join(names)}")
        return names.index(from_layer)
    if blocks is not None:
        order = list(dict.fromkeys(filter(None, (block_of(layer.name) for layer in layers))))
        if blocks == 0:
            return len(layers)
        if not 1 <= blocks <= len(order):
            raise ValueError(f"the backbone {backbone.name!r} has {len(order)} blocks "
                             f"({', '.join(order) or 'none that block_of knows'}), asked to "
                             f"train the last {blocks}")
        return next(index for index, layer in enumerate(layers) if block_of(layer.name) == order[-blocks])
    return 0


def train_top_of_backbone(backbone: keras.Model, *, from_layer: str | None = None,
                          blocks: int | None = None, freeze_batch_norm: bool = False) -> list[str]:
    """Makes only the top of backbone trainable (`first_trainable_layer`) and freezes the layers
    below: weights and BatchNormalization moving statistics (a frozen Keras BN normalises with
    its moving statistics and does not update them). With freeze_batch_norm the top's BN layers
    are frozen too, so the top's features in training mode are its inference-mode features.

    Returns:
      the names of the trainable layers, in graph order.
    """
    first = first_trainable_layer(backbone, from_layer=from_layer, blocks=blocks)
    layers = leaf_layers(backbone)
    backbone.trainable = True
    # Each layer is set: Keras does not pass a model's trainable on to the layers of a nested
    # model that were set on their own before.
    for index, layer in enumerate(layers):
        layer.trainable = index >= first and not (
            freeze_batch_norm and isinstance(layer, keras.layers.BatchNormalization))
    return [layer.name for layer in layers[first:] if layer.trainable]


def reestimate_batch_norm_statistics(backbone: keras.Model, image_batches: Iterable,
                                     from_layer: int = 0) -> int:
    """Sets the moving mean and variance of the BatchNormalization layers of backbone from
    `leaf_layers(backbone)[from_layer]` on to the mean, over image_batches, of the batch
    statistics each normalises with in training mode (its inputs coming from the layers below,
    normalised with batch statistics from `from_layer` on and with their moving statistics
    below it): the statistics stage II's batch-statistics BN on that top would settle at.

    Keras' own update is an exponential moving average, weighted towards the last batches, so
    each batch runs with momentum 0 (moving statistics := the batch's) and the values are averaged
    here. The layers' trainable flags and momentum are put back; no weight other than those
    moving statistics changes.

    Args:
      backbone: float32 [B, S, S, 3] RGB in 0..255 -> [B, F], as `build_image_backbone`.
      image_batches: float32 [B, S, S, 3] batches of images in 0..255, B >= 2.
      from_layer: an index into `leaf_layers(backbone)` (`first_trainable_layer`); 0: all.

    Returns:
      the number of batches averaged.

    Raises:
      ValueError: image_batches is empty.
    """
    all_layers = [(index, layer) for index, layer in enumerate(leaf_layers(backbone))
                  if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.trainable, layer.momentum) for _, layer in all_layers]
    layers = [layer for index, layer in all_layers if index >= from_layer]
    statistics = [(layer.moving_mean, layer.moving_variance) for layer in layers]
    pretrained = [[keras.ops.convert_to_numpy(variable) for variable in pair] for pair in statistics]
    sums = [[np.zeros(value.shape, np.float64) for value in pair] for pair in pretrained]
    batches = 0
    for index, layer in all_layers:
        layer.trainable = index >= from_layer
        if layer.trainable:
            layer.momentum = 0.0
    try:
        forward = tf.function(lambda images: backbone(images, training=True))
        for images in image_batches:
            forward(images)
            for pair_sums, pair in zip(sums, statistics):
                for total, variable in zip(pair_sums, pair):
                    total += keras.ops.convert_to_numpy(variable)
            batches += 1
        if not batches:
            raise ValueError(f"no images to re-estimate the BatchNorm statistics of {backbone.name!r} on")
        averages = [[total / batches for total in pair_sums] for pair_sums in sums]
    except BaseException:
        averages = pretrained  # an interrupted pass leaves the statistics as they were
        raise
    finally:
        for (trainable, momentum), (_, layer) in zip(saved, all_layers):
            layer.trainable, layer.momentum = trainable, momentum
        for pair, values in zip(statistics, averages):
            for variable, value in zip(pair, values):
                variable.assign(value.astype(np.float32))
    return batches
