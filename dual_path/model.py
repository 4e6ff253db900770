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

import keras
import numpy as np

from dual_path import instance_classifier
from dual_path.config import DualPathConfig
from dual_path.image_path import build_image_backbone
from dual_path.text_path import WORD_EMBEDDING, build_text_path

SHARED_CLASSIFIER = "shared_classifier"


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
