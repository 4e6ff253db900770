"""The dual-path model: an image path and a text path that share one instance classifier.

Data flow (paper Section 3, Fig. 2):

  image float32 [B, S, S, 3], RGB 0..255 -> image backbone (pool5) -> image head
  token_ids int32 [B, L]                 -> text CNN (max pool)    -> text head
  head: fc -> BN -> ReLU -> fc -> BN -> ReLU -> Dropout            (own weights per path)
  both heads' outputs -> the shared classifier W (dense or cosine) -> logits [B, C]
  the retrieval embedding, by default after the last BN (before its ReLU), L2-normalised.

Logits and embeddings are float32 even under the mixed_float16 dtype policy.
"""
import dataclasses
from typing import Sequence

import keras
import numpy as np

from dual_path import instance_classifier
from dual_path.image_path import build_image_backbone
from dual_path.text_path import WORD_EMBEDDING, build_text_path

EMBEDDING_POINTS = ("bn", "relu", "dropout")
SHARED_CLASSIFIER = "shared_classifier"


@dataclasses.dataclass
class DualPathConfig:
    """Every hyperparameter of the model architecture, in one place."""

    vocab_size: int
    """Number of token ids, reserved ones included (`Vocabulary.size`)."""
    num_classes: int
    """C: one class per training image (instance loss): the classifier's output size."""
    max_length: int = 32
    """L: token ids per caption, padded with 0 (the original uses 32)."""

    backbone: str = "ResNet50"
    """A keras.applications constructor name, or "small_cnn"."""
    weights: str | None = "imagenet"
    """Backbone weights: "imagenet", None (random), or a weights file path."""
    image_size: int = 224
    """S: the side of the square input image, in pixels."""
    alpha: float | None = None
    """Width multiplier of MobileNet / MobileNetV2 / MobileNetV3; None for the default."""
    small_cnn_widths: Sequence[int] = (32, 64, 128, 256)
    """Output channels of the small_cnn's stride-2 conv blocks (backbone="small_cnn" only)."""

    embedding_dim: int = 300
    """Size of a word vector (word2vec's is 300)."""
    embedding_lr_multiplier: float = 1e-3
    """Learning rate multiplier of the word embedding (see `DualPath.lr_multipliers`)."""
    text_blocks: Sequence[int] = (3, 4, 6, 1)
    """Residual bottleneck blocks per text CNN stage."""
    text_widths: Sequence[int] = (256, 512, 1024, 2048)
    """Output channels per text CNN stage; the bottleneck is a quarter of it."""

    head_dims: Sequence[int] = (2048, 2048)
    """Output sizes of the head's fc -> BN -> ReLU layers; D = head_dims[-1]."""
    dropout: float = 0.75
    """Dropout rate before the classifier: 0.75 Flickr30k, 0.5 MSCOCO, 0.8 CUHK-PEDES."""
    embedding_point: str = "bn"
    """Where the retrieval embedding is taken: "bn" (after the last BN, the original's
    choice), "relu" (after the last ReLU) or "dropout" (the classifier's input)."""

    share_classifier: bool = True
    """One classifier for both paths (the paper); False gives each path its own (ablation)."""
    classifier_bias: bool = False
    """Whether the classifier has a bias (dense only)."""
    classifier: str = "dense"
    """The instance classifier's form: "dense" (the paper's) or "cosine" (scaled cosine
    softmax, NormFace); see `dual_path.instance_classifier`."""
    classifier_scale: float = 16.0
    """s of the cosine classifier: its logits lie in [-s, s]."""
    classifier_lr_multiplier: float = 1.0
    """Learning rate multiplier of the classifier's weights (see `DualPath.lr_multipliers`)."""

    def __post_init__(self):
        if self.embedding_point not in EMBEDDING_POINTS:
            raise ValueError(f"embedding_point must be one of {EMBEDDING_POINTS}, "
                             f"got {self.embedding_point!r}")
        if not self.head_dims:
            raise ValueError("head_dims must name at least one fc layer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.classifier not in instance_classifier.CLASSIFIERS:
            raise ValueError(f"classifier must be one of {instance_classifier.CLASSIFIERS}, "
                             f"got {self.classifier!r}")
        if self.classifier == "cosine" and self.classifier_bias:
            raise ValueError("a cosine classifier has no bias: drop classifier_bias")
        if not self.classifier_scale > 0 or self.classifier_lr_multiplier < 0:
            raise ValueError(f"classifier_scale must be > 0 and classifier_lr_multiplier >= 0, got "
                             f"{self.classifier_scale} and {self.classifier_lr_multiplier}")


@dataclasses.dataclass
class DualPath:
    """The built model and handles on the parts the trainer and the exporter need.

    All models share the same layers and weights.
    """

    config: DualPathConfig
    training_model: keras.Model
    """{"image": float32 [B, S, S, 3], "token_ids": int32 [B, L]} ->
    {"image_logits": float32 [B, C], "text_logits": float32 [B, C],
     "image_embedding": float32 [B, D], "text_embedding": float32 [B, D]} (embeddings L2-normalised)."""
    feature_training_model: keras.Model
    """The training model from the backbone's output on: {"image_features": float32 [B, F]
    (pooled backbone features, e.g. a cache of the frozen backbone's), "token_ids": int32 [B, L]}
    -> the same outputs as training_model, with the same layers and weights."""
    image_encoder: keras.Model
    """float32 [B, S, S, 3], RGB 0..255 -> float32 [B, D], L2-normalised."""
    text_encoder: keras.Model
    """int32 [B, L] token ids -> float32 [B, D], L2-normalised."""
    backbone: keras.Model
    """The image CNN; `backbone.trainable = False` freezes it, BN moving statistics included (stage I)."""
    text_cnn: keras.Model
    """The text CNN, word embedding included."""
    image_classifier: keras.layers.Layer
    text_classifier: keras.layers.Layer
    """The same layer object as image_classifier when config.share_classifier."""
    image_head: "Head"

    def lr_multipliers(self) -> dict[str, float]:
        """Learning rate multiplier of every trainable variable, keyed by `variable.path`.

        1.0 everywhere except the word embedding (config.embedding_lr_multiplier) and the
        classifiers' weights (config.classifier_lr_multiplier). Call it after freezing: frozen
        variables are not listed.
        """
        multipliers = {variable.path: 1.0 for variable in self.training_model.trainable_variables}
        for classifier in self.classifiers():
            for variable in classifier.trainable_variables:
                multipliers[variable.path] = self.config.classifier_lr_multiplier
        embedding_path = self.text_cnn.get_layer(WORD_EMBEDDING).embeddings.path
        if embedding_path in multipliers:
            multipliers[embedding_path] = self.config.embedding_lr_multiplier
        return multipliers

    def classifiers(self) -> list[keras.layers.Layer]:
        """The distinct classifier layers: one when shared, else the image's and the text's."""
        if self.image_classifier is self.text_classifier:
            return [self.image_classifier]
        return [self.image_classifier, self.text_classifier]


class Head:
    """One path's head: features [B, F] -> (classifier input [B, D], L2-normalised float32
    embedding [B, D]).

    fc -> BN -> ReLU per entry of head_dims, then Dropout; the embedding is taken at
    config.embedding_point of the last fc layer. The layers are created once, so calling the
    head on two inputs (the backbone's output, cached backbone features) shares its weights.
    """

    def __init__(self, config: DualPathConfig, path: str):
        self.embedding_point = config.embedding_point
        self.blocks = [
            (keras.layers.Dense(dim, use_bias=False, name=f"{path}_fc{index}"),
             keras.layers.BatchNormalization(name=f"{path}_fc{index}_bn"),
             keras.layers.ReLU(name=f"{path}_fc{index}_relu"))
            for index, dim in enumerate(config.head_dims, start=1)
        ]
        self.dropout = keras.layers.Dropout(config.dropout, name=f"{path}_dropout")
        self.normalize = keras.layers.UnitNormalization(dtype="float32", name=f"{path}_embedding")

    def __call__(self, features):
        x = features
        for dense, batch_norm, relu in self.blocks:
            after_bn = batch_norm(dense(x))
            x = relu(after_bn)
        after_relu = x
        x = self.dropout(x)
        embedding_source = {"bn": after_bn, "relu": after_relu, "dropout": x}[self.embedding_point]
        return x, self.normalize(embedding_source)

    def whole_set_features(self, features: np.ndarray) -> np.ndarray:
        """float32 [N, D]: the classifier input of N rows of features [N, F] as training mode
        computes it on one batch of all N rows, without dropout: each BN normalises by the
        rows' own mean and variance (then its gamma, beta). Changes no variable (the BN moving
        statistics stay as they are); what imprinting the classifier uses.
        """
        x = keras.ops.convert_to_tensor(np.asarray(features, np.float32))
        for dense, batch_norm, relu in self.blocks:
            x = dense(x)
            mean, variance = keras.ops.moments(x, axes=[0])
            x = (x - mean) * keras.ops.rsqrt(variance + batch_norm.epsilon)
            x = relu(x * batch_norm.gamma + batch_norm.beta)
        return keras.ops.convert_to_numpy(x).astype(np.float32)


def _classifiers(config: DualPathConfig) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """The (image, text) classifiers: one layer twice, or two. Computed in float32."""
    def classifier(name):
        return instance_classifier.build_classifier(
            config.classifier, config.num_classes, scale=config.classifier_scale,
            use_bias=config.classifier_bias, name=name)

    if config.share_classifier:
        shared = classifier(SHARED_CLASSIFIER)
        return shared, shared
    return classifier("image_classifier"), classifier("text_classifier")


def build_dual_path(config: DualPathConfig, embedding_init: np.ndarray | None = None) -> DualPath:
    """Builds the dual-path model.

    Args:
      config: the architecture.
      embedding_init: None or float [vocab_size, embedding_dim], the word embedding's initial
        value (np.load(text.word2vec_init_path(shard_dir))).
    """
    images = keras.Input(shape=(config.image_size, config.image_size, 3), dtype="float32",
                         name="image")
    token_ids = keras.Input(shape=(config.max_length,), dtype="int32", name="token_ids")

    backbone = build_image_backbone(config.backbone, config.weights, config.image_size,
                                    config.alpha, config.small_cnn_widths)
    image_head = Head(config, "image")
    image_features, image_embedding = image_head(backbone(images))

    text_cnn = build_text_path(config.vocab_size, config.max_length, config.embedding_dim,
                               embedding_init, config.text_blocks, config.text_widths)
    text_features, text_embedding = Head(config, "text")(text_cnn(token_ids))

    image_classifier, text_classifier = _classifiers(config)
    text_logits = text_classifier(text_features)
    text_outputs = {"text_logits": text_logits, "text_embedding": text_embedding}

    training_model = keras.Model(
        inputs={"image": images, "token_ids": token_ids},
        outputs={"image_logits": image_classifier(image_features), "image_embedding": image_embedding,
                 **text_outputs},
        name="dual_path",
    )
    backbone_features = keras.Input(shape=backbone.output.shape[1:], name="image_features")
    cached_features, cached_embedding = image_head(backbone_features)
    feature_training_model = keras.Model(
        inputs={"image_features": backbone_features, "token_ids": token_ids},
        outputs={"image_logits": image_classifier(cached_features),
                 "image_embedding": cached_embedding, **text_outputs},
        name="dual_path_on_features",
    )
    return DualPath(
        config=config,
        training_model=training_model,
        feature_training_model=feature_training_model,
        image_encoder=keras.Model(images, image_embedding, name="image_encoder"),
        text_encoder=keras.Model(token_ids, text_embedding, name="text_encoder"),
        backbone=backbone,
        text_cnn=text_cnn,
        image_classifier=image_classifier,
        text_classifier=text_classifier,
        image_head=image_head,
    )
