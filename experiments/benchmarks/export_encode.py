"""Times the exported SavedModel's encoders against the Keras model it came from (run by hand).

A dual-path model built from a training config (--config and any training flag, as
experiments.benchmarks.train_step takes them; the weights' values do not change the timing) is
wrapped in `dual_path.export.EmbeddingModule` with --shard_dir's vocab.txt and manifest (vocabulary size, caption length, oov handling),
saved with `tf.saved_model.save` and loaded back with `tf.saved_model.load` in the same
process. Then, on the images and captions of a raw dataset (default: the first --max_images
images of ../shared's Flickr8k dev split and their captions), in batches of --batch_size,
each after one untimed pass:

  images: `encode_image_tensors` vs the Keras image_encoder (in a tf.function, as evaluation
          runs it) on the same float32 batches; `encode_images` on the files' JPEG bytes
          (decoded one by one inside the graph) vs a tf.data pipeline that decodes and resizes
          them in parallel (`input_pipeline.decode_and_resize`) into the Keras image_encoder;
  texts:  `encode_texts` on the raw sentences vs the Keras text_encoder on token ids
          tokenized beforehand, and vs tokenizing in Python (`text.tokenize`,
          `Vocabulary.encode`) inside the timing, then the text_encoder.

Every embedding is read back to the host. The SavedModel's embeddings must equal the Keras
ones (the script stops otherwise).

    python -m experiments.benchmarks.export_encode
    python -m experiments.benchmarks.export_encode --max_images=1000 --batch_size=64 \\
        --output_json=experiments/results/benchmarks/export_encode.json
    python -m experiments.benchmarks.export_encode --flip_images --shift_texts

The defaults take about a minute on 2 CPU cores.
"""
import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import tensorflow as tf
from absl import flags

from data_prep import readers
from data_prep.records import DataFormatError
from dual_path import embeddings, export, input_pipeline, text
from dual_path.model import DualPath, build_dual_path
from experiments import config_flags
from experiments.benchmarks import report, train_step

MAX_ABS_DIFFERENCE = 1e-4
"""The largest |SavedModel - Keras| embedding difference accepted (unit-length rows)."""


def _parse_args() -> tuple[argparse.Namespace, flags.FlagValues]:
    """The benchmark's arguments, and the training flags of --config (as train_step takes them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_step.add_config_arguments(parser)
    report.add_raw_dataset_arguments(parser, splits=("dev",))
    parser.add_argument("--max_images", type=int, default=256,
                        help="images encoded (the first ones); their captions are the texts")
    parser.add_argument("--batch_size", type=int, default=32, help="images or captions per encoder call")
    parser.add_argument("--flip_images", action="store_true", help="export with evaluation's image flip")
    parser.add_argument("--shift_texts", action="store_true", help="export with evaluation's text shifts")
    report.add_output_argument(parser)
    args, flag_values = train_step.parse_config_flags(parser)
    for name in ("max_images", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args, flag_values


def _batches(items, batch_size: int) -> list:
    return [items[start:start + batch_size] for start in range(0, len(items), batch_size)]


def time_passes(encode: Callable[[object], tf.Tensor], batches: Iterable) -> tuple[float, np.ndarray]:
    """Seconds of the second of two passes of encode over the batches, and its embeddings [N, D]."""
    for batch in batches:
        encode(batch).numpy()
    start = time.perf_counter()
    outputs = [encode(batch).numpy() for batch in batches]
    return time.perf_counter() - start, np.concatenate(outputs)


def _check_equal(name: str, saved_model: np.ndarray, keras: np.ndarray) -> None:
    difference = float(np.max(np.abs(saved_model - keras)))
    print(f"  {name}: max |SavedModel - Keras| = {difference:.2e}")
    if not difference <= MAX_ABS_DIFFERENCE:
        sys.exit(f"export_encode: the SavedModel's {name} embeddings differ from the Keras model's "
                 f"by {difference:.2e} (more than {MAX_ABS_DIFFERENCE})")


def time_encoders(model: DualPath, module: export.EmbeddingModule, signatures,
                  vocabulary_file: str, image_bytes: list[bytes], sentences: list[str],
                  batch_size: int) -> dict:
    """{figure name: images/s or captions/s} of the loaded SavedModel's signatures and of the
    Keras encoders of `model`, which `module` was made from, on encoded image files and raw
    sentences."""
    vocabulary = text.Vocabulary.load(vocabulary_file)
    image_size, max_length = module.image_size, module.max_length

    def token_ids(batch_sentences) -> np.ndarray:
        """int32 [B, L]: each sentence's ids from slot 0, as the shards and encode_texts place them."""
        ids = np.zeros([len(batch_sentences), max_length], np.int32)
        for row, sentence in enumerate(batch_sentences):
            encoded = vocabulary.encode(text.tokenize(sentence), max_length, oov=module.oov)
            ids[row, :len(encoded)] = encoded
        return ids

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        return input_pipeline.decode_and_resize(encoded, image_size)

    float_batches = [tf.stack([decode(encoded) for encoded in batch])
                     for batch in _batches(image_bytes, batch_size)]
    byte_batches = [tf.constant(batch) for batch in _batches(image_bytes, batch_size)]
    sentence_lists = _batches(sentences, batch_size)
    sentence_batches = [tf.constant(batch) for batch in sentence_lists]
    id_batches = [tf.constant(token_ids(batch)) for batch in sentence_lists]
    keras_images = tf.function(
        lambda images: embeddings.embed_images(model.image_encoder, images, module.flip_images))
    keras_texts = tf.function(lambda ids: embeddings.embed_texts(model.text_encoder, ids, module.shift_texts))
    jpeg_pipeline = (tf.data.Dataset.from_tensor_slices(tf.constant(image_bytes))
                     .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
                     .batch(batch_size)
                     .prefetch(tf.data.AUTOTUNE))

    def embeddings_of(name):
        return lambda **inputs: signatures[name](**inputs)[export.EMBEDDINGS_KEY]

    image_timings = {
        "saved_model_image_tensors": time_passes(
            lambda batch: embeddings_of("encode_image_tensors")(images=batch), float_batches),
        "keras_image_tensors": time_passes(keras_images, float_batches),
        "saved_model_jpeg": time_passes(lambda batch: embeddings_of("encode_images")(image_bytes=batch),
                                        byte_batches),
        "keras_jpeg": time_passes(keras_images, jpeg_pipeline),
    }
    text_timings = {
        "saved_model_sentences": time_passes(
            lambda batch: embeddings_of("encode_texts")(sentences=batch), sentence_batches),
        "keras_token_ids": time_passes(keras_texts, id_batches),
        "keras_python_tokenize": time_passes(lambda batch: keras_texts(token_ids(batch)), sentence_lists),
    }
    has_tokens = np.concatenate([batch.numpy() for batch in id_batches]).any(axis=1)
    print("embeddings compared:")
    _check_equal("image tensor", image_timings["saved_model_image_tensors"][1],
                 image_timings["keras_image_tensors"][1])
    _check_equal("JPEG", image_timings["saved_model_jpeg"][1], image_timings["keras_jpeg"][1])
    _check_equal("sentence", text_timings["saved_model_sentences"][1][has_tokens],
                 text_timings["keras_token_ids"][1][has_tokens])
    figures = {f"{name}_images_per_s": len(image_bytes) / seconds for name, (seconds, _) in image_timings.items()}
    figures.update({f"{name}_captions_per_s": len(sentences) / seconds
                    for name, (seconds, _) in text_timings.items()})
    return figures


def main() -> None:
    args, flag_values = _parse_args()
    shard_dir = flag_values.shard_dir
    manifest = train_step.load_manifest_or_explain(shard_dir, "there is no vocabulary to export")
    if manifest is None:
        sys.exit(1)
    try:
        source = readers.read_source(
            args.source_format, captions=args.captions, image_root=args.image_root, split_files=args.split_files)
    except (DataFormatError, ValueError) as error:
        sys.exit(f"export_encode: error: {error}")
    records = source.records[:args.max_images]
    if not records:
        sys.exit(f"export_encode: error: {args.captions} has no images")
    try:
        image_bytes = [Path(record.path).read_bytes() for record in records]
    except OSError as error:
        sys.exit(f"export_encode: error: cannot read an image: {error}")
    sentences = [caption for record in records for caption in record.captions]

    try:
        config = config_flags.model_config(flag_values, manifest)
    except ValueError as error:
        sys.exit(f"export_encode: error: {error}")
    config = dataclasses.replace(config, weights=train_step.runnable_weights(config.weights))
    model = build_dual_path(config)
    vocabulary_file = text.vocabulary_path(shard_dir)
    module = export.EmbeddingModule(model, vocabulary_file, oov=manifest["oov"],
                                    flip_images=args.flip_images, shift_texts=args.shift_texts)
    with tempfile.TemporaryDirectory(prefix="dual_path_export_") as export_dir:
        tf.saved_model.save(module, export_dir, signatures=module.signatures())
        signatures = tf.saved_model.load(export_dir).signatures
        figures = time_encoders(model, module, signatures, vocabulary_file, image_bytes, sentences, args.batch_size)

    ratios = {
        "saved_model_over_keras_image_tensors":
            figures["saved_model_image_tensors_images_per_s"] / figures["keras_image_tensors_images_per_s"],
        "saved_model_over_keras_jpeg":
            figures["saved_model_jpeg_images_per_s"] / figures["keras_jpeg_images_per_s"],
        "saved_model_sentences_over_keras_token_ids":
            figures["saved_model_sentences_captions_per_s"] / figures["keras_token_ids_captions_per_s"],
        "saved_model_sentences_over_keras_python_tokenize":
            figures["saved_model_sentences_captions_per_s"] / figures["keras_python_tokenize_captions_per_s"],
    }
    print(f"\n{report.describe(report.machine())}")
    print(f"{config.backbone} (alpha {config.alpha}) at {config.image_size} px, text blocks {config.text_blocks} "
          f"widths {config.text_widths}, L {config.max_length}; {len(records)} images, {len(sentences)} captions "
          f"of {source.name}, batch {args.batch_size}, flip_images {args.flip_images}, "
          f"shift_texts {args.shift_texts}")
    rows = [
        ("images: SavedModel encode_image_tensors, float32 batches", "saved_model_image_tensors_images_per_s",
         "saved_model_over_keras_image_tensors"),
        ("        Keras image_encoder, the same batches", "keras_image_tensors_images_per_s", None),
        ("images: SavedModel encode_images, JPEG bytes", "saved_model_jpeg_images_per_s",
         "saved_model_over_keras_jpeg"),
        ("        tf.data decode + resize -> Keras image_encoder", "keras_jpeg_images_per_s", None),
        ("texts:  SavedModel encode_texts, raw sentences", "saved_model_sentences_captions_per_s",
         "saved_model_sentences_over_keras_token_ids"),
        ("        Keras text_encoder, ids tokenized beforehand", "keras_token_ids_captions_per_s", None),
        ("        Python tokenize + Keras text_encoder", "keras_python_tokenize_captions_per_s",
         "saved_model_sentences_over_keras_python_tokenize"),
    ]
    print(f"{'':<60}{'per second':>12}  SavedModel / Keras")
    for label, figure, ratio in rows:
        ratio_text = f"{ratios[ratio]:.2f}" if ratio else ""
        print(f"{label:<60}{figures[figure]:>12.1f}  {ratio_text}")

    if args.output_json:
        settings = {**vars(args), "images": len(records), "captions": len(sentences), "oov": manifest["oov"],
                    "vocab_size": config.vocab_size, "max_length": config.max_length}
        report.write_report(args.output_json, "export_encode", figures, ratios, settings)


if __name__ == "__main__":
    main()
