"""A trained run as a SavedModel that embeds raw images and sentences, for serving and search.

The SavedModel (`tf.saved_model.save` of an `EmbeddingModule`) needs only TensorFlow to load:
image decoding and resizing (`input_pipeline.decode_and_resize`, as evaluation does it),
tokenizing (`text.tf_tokenize`) and the vocabulary lookup are TF ops inside it, and vocab.txt
ships as one of its assets. Every signature takes its input by keyword and returns
{"embeddings": float32 [B, D]}, rows L2-normalised unless said otherwise:

  encode_images(image_bytes: tf.string [B])             JPEG or PNG bytes, any size
  encode_image_tensors(images: float32 [B, S, S, 3])    RGB in 0..255
  encode_texts(sentences: tf.string [B])                raw UTF-8 sentences
  encode_token_ids(token_ids: int32 [B, L])             token ids as the shards hold them
  serving_default                                       the same function as encode_texts

Usage, with TensorFlow alone:

  loaded = tf.saved_model.load(export_dir)
  loaded.signatures["encode_texts"](sentences=tf.constant(["a red circle"]))["embeddings"]
  loaded.encode_images(tf.constant([jpeg_bytes]))["embeddings"]  # the same, called directly

Image similarity to a sentence is the dot product of their embeddings. The export's
settings (S, L, D, flip, shift, ...) are in export_info.json next to saved_model.pb.

A sentence with no known word (empty, only punctuation, or only words outside the
vocabulary when the shards drop them) embeds as a zero vector: norm 0, similarity 0 to every
image, so it ranks nothing above anything; it is not given a made-up unit embedding. Every
signature returns float32 [0, D] for an empty batch. Bytes that are not an image are refused
with InvalidArgumentError. The export loads with TF2's
`tf.saved_model.load` and with TF1's session loader (`tf.compat.v1.saved_model.loader.load`,
`saved_model_cli run`), which is how TF Serving loads it:

  saved_model_cli run --dir model_dir/export/1 --tag_set serve --signature_def encode_texts \
      --input_exprs 'sentences=["a red circle"]'

Layout: `dual-path-export` writes model_dir/export/<version>/ (TF Serving's layout, versions
1, 2, ...), first under a temporary name, renamed once complete.
"""
import dataclasses
import datetime
import os
from typing import NamedTuple

import keras
import tensorflow as tf

from dual_path import embeddings, input_pipeline, run_layout, text
from dual_path.model import DualPath

EXPORT_DIR_NAME = "export"
EXPORT_INFO_NAME = "export_info.json"
EMBEDDINGS_KEY = "embeddings"
SIGNATURES = ("encode_images", "encode_image_tensors", "encode_texts", "encode_token_ids")
SERVING_DEFAULT = "encode_texts"
MANIFEST_OOV = "oov"
MANIFEST_MAX_LENGTH = "max_length"


@dataclasses.dataclass(frozen=True)
class _Encoders:
    """The Keras encoders, in a holder that tf.Module does not track (see `EmbeddingModule`)."""

    image: keras.Model
    text: keras.Model


def _variables_read_by(functions) -> list[tf.Variable]:
    """The tf.Variables the concrete functions capture, each once, in the order first read."""
    seen, variables = set(), []
    for function in functions:
        for variable in function.variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    return variables


class EmbeddingModule(tf.Module):
    """The trained encoders with everything between raw inputs and embeddings, as TF graphs.

    What the SavedModel tracks is the tf.Variables the signatures read, not the Keras models.
    Keras 3 saves a tracked `keras.Variable` as a new tf.Variable initialised from its value
    (`Variable._export_to_saved_model_graph`), and the SavedModel's checkpoint restores that
    copy (graph names "Variable", "Variable_1", ...), while the traced signatures read the
    underlying tf.Variable, copied into the graph under the layer's name ("text_fc2_bn/gamma").
    TF2's loader rebinds the functions to the restored objects, but TF1's session loader (TF
    Serving, `saved_model_cli run`) runs only the checkpoint's restore op, which leaves every
    variable the signatures read uninitialised ("Could not find variable text_fc2_bn/gamma").
    Tracking the variables the signatures read makes the restore op write exactly those, once.

    Args:
      model: the trained model (`run_layout.restore`); its config gives S and L.
      vocabulary_file: the shards' vocab.txt (`text.Vocabulary` format: ids 0 and 1 reserved,
        words from id 2 in file order); copied into the SavedModel's assets.
      oov: the shards' handling of words outside the vocabulary: "drop" or "unk".
      flip_images: image embeddings add the horizontal mirror's embedding before normalising
        (evaluation's `flip_images`).
      shift_texts: encode_texts sums a sentence's embeddings at every position of its L slots
        before normalising (evaluation's `shift_texts`); else it is placed at slot 0.
    """

    def __init__(self, model: DualPath, vocabulary_file: str, *, oov: str, flip_images: bool,
                 shift_texts: bool):
        super().__init__(name="dual_path_embeddings")
        if oov not in text.OOV_MODES:
            raise ValueError(f"oov must be one of {text.OOV_MODES}, got {oov!r}")
        vocabulary = text.Vocabulary.load(vocabulary_file)
        if vocabulary.size != model.config.vocab_size:
            raise ValueError(f"{vocabulary_file}: {vocabulary.size} token ids, but the model was "
                             f"trained with vocab_size {model.config.vocab_size}")
        self._encoders = _Encoders(model.image_encoder, model.text_encoder)
        self.embedding_size = int(model.config.head_dims[-1])
        self.image_size = model.config.image_size
        self.max_length = model.config.max_length
        self.oov = oov
        self.flip_images = flip_images
        self.shift_texts = shift_texts
        # word -> its line number in vocab.txt (the id less the reserved ones); -1 if absent.
        self.vocabulary_table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(
                vocabulary_file, key_dtype=tf.string, key_index=0, value_dtype=tf.int64,
                value_index=tf.lookup.TextFileIndex.LINE_NUMBER, delimiter=" ",
                vocab_size=len(vocabulary.words)),
            default_value=-1)

        size = self.image_size
        self.encode_images = tf.function(self._encode_images, input_signature=[
            tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.encode_image_tensors = tf.function(self._encode_image_tensors, input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        self.encode_texts = tf.function(self._encode_texts, input_signature=[
            tf.TensorSpec([None], tf.string, name="sentences")])
        self.encode_token_ids = tf.function(self._encode_token_ids, input_signature=[
            tf.TensorSpec([None, self.max_length], tf.int32, name="token_ids")])
        self.encoder_variables = _variables_read_by(self.signatures().values())

    def signatures(self) -> dict:
        """{signature name: concrete function} for tf.saved_model.save, serving_default included."""
        functions = {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}
        return {**functions, tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY: functions[SERVING_DEFAULT]}

    def _unless_empty(self, batch: tf.Tensor, encode) -> dict:
        """{"embeddings": encode(batch)}, or float32 [0, D] without running the encoders when
        the batch is empty, so that the answer does not depend on whether each kernel on each
        device (BatchNorm's among them) accepts a batch of none."""
        return {EMBEDDINGS_KEY: tf.cond(
            tf.shape(batch)[0] > 0, lambda: encode(batch),
            lambda: tf.zeros([0, self.embedding_size], tf.float32))}

    def _encode_images(self, image_bytes: tf.Tensor) -> dict:
        """Embeds encoded images, decoded and resized whole to S x S as evaluation does.

        Args:
          image_bytes: tf.string [B], each a JPEG or PNG file's bytes (GIF, BMP and WebP decode
            too: first frame), any size; grey images become RGB.
        Returns:
          {"embeddings": float32 [B, D]}, L2-normalised (with the mirror's embedding added
          first when the export flips images).
        Raises:
          InvalidArgumentError "Unknown image file format..." / "Input is empty." for bytes
          that are not such an image.
        """
        def decode_and_embed(image_bytes):
            images = tf.map_fn(
                lambda encoded: input_pipeline.decode_and_resize(encoded, self.image_size),
                image_bytes,
                fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32))
            return embeddings.embed_images(self._encoders.image, images, self.flip_images)
        return self._unless_empty(image_bytes, decode_and_embed)

    def _encode_image_tensors(self, images: tf.Tensor) -> dict:
        """Embeds decoded images already at the model's size.

        Args:
          images: float32 [B, S, S, 3], RGB in 0..255 (no normalisation: the model does it).
        Returns:
          {"embeddings": float32 [B, D]}, L2-normalised (with the mirror's embedding added
          first when the export flips images).
        """
        return self._unless_empty(
            images, lambda images: embeddings.embed_images(self._encoders.image, images, self.flip_images))

    def _encode_texts(self, sentences: tf.Tensor) -> dict:
        """Embeds raw sentences: tokenized, looked up, cut to L ids, encoded as evaluation does.

        Unknown words are dropped or become <unk> as in the shards (export_info.json "oov").
        A sentence left with no token id (empty, only punctuation, or only unknown words with
        oov "drop") embeds to a row of zeros, which is NOT unit length: its similarity to
        every image is 0.

        Args:
          sentences: tf.string [B], UTF-8.
        Returns:
          {"embeddings": float32 [B, D]}, L2-normalised rows except the zero rows above.
        """
        def tokenize_and_embed(sentences):
            line = self.vocabulary_table.lookup(text.tf_tokenize(sentences))  # int64 [B, (words)]
            if self.oov == "drop":
                line = tf.ragged.boolean_mask(line, line >= 0)
            token_ids = tf.ragged.map_flat_values(
                lambda values: tf.where(values >= 0, values + len(text.RESERVED_TOKENS), text.UNK_ID),
                line)
            token_ids = tf.cast(token_ids[:, :self.max_length], tf.int32).to_tensor(
                default_value=text.PAD_ID, shape=[None, self.max_length])
            embedding = embeddings.embed_texts(self._encoders.text, token_ids, self.shift_texts)
            has_tokens = tf.reduce_any(token_ids != text.PAD_ID, axis=1, keepdims=True)
            return tf.where(has_tokens, embedding, tf.zeros_like(embedding))
        return self._unless_empty(sentences, tokenize_and_embed)

    def _encode_token_ids(self, token_ids: tf.Tensor) -> dict:
        """The text encoder alone: one call on the captions as placed, never summed over shifts.

        For shift-summed embeddings, call it on every placement and sum (embeddings.embed_texts).

        Args:
          token_ids: int32 [B, L], ids of vocab.txt (0 padding, 1 <unk>), padding anywhere.
        Returns:
          {"embeddings": float32 [B, D]}, L2-normalised; an all-padding row gives the encoder's
          embedding of padding alone.
        """
        return self._unless_empty(
            token_ids, lambda token_ids: tf.cast(self._encoders.text(token_ids, training=False), tf.float32))


class Export(NamedTuple):
    """export_dir: the SavedModel's folder; info_path: its export_info.json; info: that JSON."""

    export_dir: str
    info_path: str
    info: dict


def next_version_dir(model_dir: str) -> str:
    """model_dir/export/<N>: N one more than the largest numeric version there (1 if none)."""
    root = os.path.join(model_dir, EXPORT_DIR_NAME)
    versions = [int(name.rstrip("/")) for name in
                (tf.io.gfile.listdir(root) if tf.io.gfile.isdir(root) else [])
                if name.rstrip("/").isdigit()]
    return os.path.join(root, str(max(versions, default=0) + 1))


def _manifest_value(shard_dir: str, manifest: dict, key: str):
    if key not in manifest:
        raise ValueError(f"{shard_dir}: the shard manifest has no {key!r}")
    return manifest[key]


def export_run(model_dir: str, *, shard_dir: str, flip_images: bool, shift_texts: bool,
               checkpoint: str = "best", export_dir: str | None = None) -> Export:
    """Exports a trained run's model as an `EmbeddingModule` SavedModel with export_info.json.

    Args:
      model_dir: the run (`run_layout.restore` rebuilds its last finished stage).
      shard_dir: where vocab.txt and manifest.json (oov, max_length) are read; nothing else
        is needed from it, and the SavedModel does not refer to it afterwards.
      flip_images, shift_texts: see `EmbeddingModule`.
      checkpoint: "best" (by validation) or "last".
      export_dir: a folder that must not exist yet; default `next_version_dir(model_dir)`.
        The SavedModel is written to export_dir + ".tmp" and renamed to export_dir once
        complete (TF Serving ignores non-numeric folders).
    Raises:
      FileExistsError: export_dir exists. ValueError: vocab.txt or the manifest does not
      match the model's config (naming the file).
    """
    model, checkpoint_path = run_layout.restore(model_dir, which=checkpoint)
    manifest = input_pipeline.load_manifest(shard_dir)
    max_length = int(_manifest_value(shard_dir, manifest, MANIFEST_MAX_LENGTH))
    if max_length != model.config.max_length:
        raise ValueError(f"{shard_dir}: the manifest's max_length {max_length} differs from the "
                         f"model's {model.config.max_length} ({model_dir})")
    vocabulary_file = text.vocabulary_path(shard_dir)
    module = EmbeddingModule(model, vocabulary_file,
                             oov=_manifest_value(shard_dir, manifest, MANIFEST_OOV),
                             flip_images=flip_images, shift_texts=shift_texts)

    export_dir = export_dir or next_version_dir(model_dir)
    if tf.io.gfile.exists(export_dir):
        raise FileExistsError(f"{export_dir} already exists: choose a new export_dir")
    tmp_dir = export_dir.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)  # left by an interrupted export
    tf.saved_model.save(module, tmp_dir, signatures=module.signatures())
    info = {
        "model_dir": model_dir,
        "checkpoint": checkpoint_path,
        "shard_dir": shard_dir,
        "image_size": module.image_size,
        "max_length": module.max_length,
        "embedding_size": module.embedding_size,
        "vocab_size": model.config.vocab_size,
        "oov": module.oov,
        "flip_images": flip_images,
        "shift_texts": shift_texts,
        "signatures": list(SIGNATURES),
        "serving_default": SERVING_DEFAULT,
        "output_key": EMBEDDINGS_KEY,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    run_layout.write_json_atomically(os.path.join(tmp_dir, EXPORT_INFO_NAME), info)
    tf.io.gfile.rename(tmp_dir, export_dir)
    return Export(export_dir, os.path.join(export_dir, EXPORT_INFO_NAME), info)
