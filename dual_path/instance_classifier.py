"""The instance classifier W shared by both paths, and its initialisation from image features.

Two forms of W [D, C] (one column per instance class):

  "dense"   logits = x @ W (+ b)                              the paper's fully connected layer
  "cosine"  logits = s * (x / |x|) @ (W / |W|_column)         NormFace (Wang et al. 2017): every
                                                              logit is s times a cosine, in [-s, s]

Why a cosine form (measured in experiments/configs/flickr8k.flags): with one class per
training image, every column of W is the target of one image and its ~5 captions, seen once
an epoch, so under SGD a column moves on 1/C of the steps. A dense W starts with logits near 0
for every class (loss ln C) and its columns' norms, not only their directions, must grow
before any class wins the softmax. The cosine form fixes the logit range to [-s, s] from the
first step, so the softmax is as sharp as it will ever be, and only directions are learnt.

Imprinting (Qi et al. 2018, "Low-shot learning with imprinted weights"): column c starts as
the normalised mean of the classifier inputs of class c's training images (the image head's
output), so the image path classifies its own training set from the first step and the text
path's instance loss asks every caption to point at its image's features, against all C
images at once. `imprint` writes the columns; the trainer computes the features.
"""
import keras
import numpy as np

CLASSIFIERS = ("dense", "cosine")
CLASSIFIER_INITS = ("random", "imprint")


@keras.saving.register_keras_serializable(package="dual_path")
class CosineClassifier(keras.layers.Layer):
    """float [B, D] -> float32 [B, C] logits = scale * cos(x_b, W[:, c]).

    The kernel W [D, C] is a plain variable (name "kernel", as Dense's); rows of x and columns
    of W are L2-normalised in the forward pass (an all-zero row gives logits 0).

    Args:
      units: C, the number of classes.
      scale: s, the logits' largest magnitude (NormFace's temperature 1/s).
    """

    def __init__(self, units: int, scale: float = 16.0, **kwargs):
        super().__init__(**kwargs)
        if units < 1 or not scale > 0:
            raise ValueError(f"a cosine classifier needs units >= 1 and scale > 0, got {units}, {scale}")
        self.units = int(units)
        self.scale = float(scale)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units),
                                      initializer="glorot_uniform")

    def call(self, inputs):
        inputs = keras.ops.cast(inputs, self.compute_dtype)
        normalized_inputs = keras.ops.normalize(inputs, axis=-1)
        normalized_kernel = keras.ops.normalize(keras.ops.cast(self.kernel, self.compute_dtype), axis=0)
        return self.scale * keras.ops.matmul(normalized_inputs, normalized_kernel)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale}


def build_classifier(kind: str, num_classes: int, *, scale: float, use_bias: bool,
                     name: str) -> keras.layers.Layer:
    """A float32 instance classifier: Dense(C) ("dense") or CosineClassifier(C, scale)."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {kind!r}")
    if kind == "dense":
        return keras.layers.Dense(num_classes, use_bias=use_bias, dtype="float32", name=name)
    if use_bias:
        raise ValueError("a cosine classifier has no bias: drop classifier_bias")
    return CosineClassifier(num_classes, scale=scale, dtype="float32", name=name)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [C, D]: the mean of the L2-normalised rows of each class (zero for a class
    without rows), itself L2-normalised.

    Args:
      features: float [N, D], one row per training image.
      labels: int [N] in [0, C), the instance class of each row.
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features [N, D] and labels [N] expected, got {features.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    rows = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels, rows)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def imprint(classifier: keras.layers.Layer, features: np.ndarray, labels: np.ndarray) -> int:
    """Sets W's column c to the normalised mean feature of class c (`class_means`).

    A dense W keeps the mean column norm it had (its logit scale at initialisation), a bias is
    zeroed; a cosine W needs no norm. Classes without a row keep their column.

    Args:
      classifier: a built Dense or CosineClassifier with kernel [D, C].
      features: float [N, D], the classifier inputs of the training images (no dropout).
      labels: int [N], their classes.
    Returns:
      the number of columns imprinted.
    """
    kernel = keras.ops.convert_to_numpy(classifier.kernel)
    if features.shape[1] != kernel.shape[0]:
        raise ValueError(f"features of size {features.shape[1]} for a classifier of input size {kernel.shape[0]}")
    means = class_means(features, labels, kernel.shape[1])
    has_rows = np.bincount(np.asarray(labels), minlength=kernel.shape[1]) > 0
    column_norm = 1.0
    if isinstance(classifier, keras.layers.Dense):
        column_norm = float(np.linalg.norm(kernel, axis=0).mean())
        if classifier.use_bias:
            classifier.bias.assign(np.zeros(kernel.shape[1], classifier.bias.dtype))
    kernel[:, has_rows] = column_norm * means[has_rows].T
    classifier.kernel.assign(kernel)
    return int(has_rows.sum())
