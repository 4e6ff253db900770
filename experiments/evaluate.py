"""Evaluates a trained run or an exported SavedModel on a split, by a published protocol
(`dual-path-evaluate`).

    dual-path-evaluate --model_dir=workspace/flickr30k/runs/base [--checkpoint=best|last]
    dual-path-evaluate --saved_model=workspace/flickr30k/runs/base/export/1

Features as the original's test computes them (`dual_path.embeddings.SplitEmbedder`): each
image plus its horizontal mirror, summed and L2-normalised (--flip_images; off where the
captions say left and right), each caption summed over its positions (--shift_texts).

Defaults: from a model_dir, the run's config tree, model_dir/config.json
(`run_layout.load_run_config`): --shard_dir from its shard_dir, --flip_images and
--shift_texts from its eval_flip_images and eval_shift_texts (what the trainer validated
with). From a SavedModel, its
export_info.json (dual_path/export.py): shard_dir, flip_images, shift_texts. The
SavedModel's encode_image_tensors already adds the mirror when the export flips, so such an
export cannot be evaluated with --noflip_images; one that does not flip can be, either way.

Computes the protocol's metrics (`dual_path.protocols`; --protocol=auto picks it from the
manifest's dataset name and the split's size), prints them as the protocol's table
(`experiments.tables`) and writes them as JSON (--output; default
<model_dir>/eval_<split>_<protocol>.json, or <saved_model>_eval_<split>_<protocol>.json
beside the SavedModel folder; _precise_bn_<N> before .json with --precise_bn_blocks) with the
checkpoint, the flags and timing in seconds.
"""
import json
import os
import sys
import time
from typing import NamedTuple

import tensorflow as tf
from absl import app, flags, logging

from dual_path import (embeddings, export, image_path, input_pipeline, protocols, run_layout,
                       training)
from experiments import commands, tables

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags; called by run() only (see data_prep/build_shards.py)."""
    flags.DEFINE_string("model_dir", None, "A training run's folder (dual-path-train --model_dir).")
    flags.DEFINE_enum("checkpoint", "best", list(run_layout.CHECKPOINT_CHOICES),
                      "With --model_dir: the best-by-validation or the last checkpoint.")
    flags.DEFINE_string("saved_model", None, "An exported SavedModel folder (dual-path-export).")
    flags.DEFINE_string("shard_dir", None,
                        "The dataset's shards; default: the run's (config.json / export_info.json).")
    flags.DEFINE_string("split", "test", "The split to evaluate.")
    flags.DEFINE_enum("protocol", protocols.AUTO, [protocols.AUTO, *protocols.PROTOCOLS],
                      "Evaluation protocol; auto: from the dataset name and the split's size.")
    flags.DEFINE_bool("flip_images", None,
                      "Add the mirrored image's embedding; default: the run's eval_flip_images "
                      "(the export's flip_images).")
    flags.DEFINE_bool("shift_texts", None,
                      "Sum each caption over its positions; default: the run's eval_shift_texts "
                      "(the export's shift_texts).")
    flags.DEFINE_integer(
        "precise_bn_blocks", None,
        "With --model_dir: first re-estimate the BatchNorm statistics of the backbone's last N "
        "blocks (and the layers after them) on one augmented view of every training image, as "
        "--stage2_precise_bn does at the end of stage II (the run's batch size, seed and flip).",
        lower_bound=1)
    flags.DEFINE_integer("image_batch_size", embeddings.DEFAULT_IMAGE_BATCH,
                         "Images per encoder call.", lower_bound=1)
    flags.DEFINE_integer("text_batch_size", embeddings.DEFAULT_TEXT_BATCH,
                         "Encoder rows per text call.", lower_bound=1)
    flags.DEFINE_string("output", None, "The results JSON; default: see the module docstring.")
    flags.mark_flags_as_mutual_exclusive(["model_dir", "saved_model"], required=True)


class Encoders(NamedTuple):
    """A model to evaluate, as SplitEmbedder takes it.

    image_encoder: float32 [B, S, S, 3] RGB 0..255 -> float32 [B, D] (L2-normalised);
      mirrors_images: it already adds the mirrored image's embedding.
    text_encoder: int32 [B, L] token ids -> float32 [B, D] (L2-normalised).
    image_size, max_length: S and L.
    source: what the results JSON records of where the model came from.
    defaults: {"shard_dir", "flip_images", "shift_texts"} that the run recorded;
      defaults_file: the file they were read from.
    """

    image_encoder: object
    text_encoder: object
    mirrors_images: bool
    image_size: int
    max_length: int
    source: dict
    defaults: dict
    defaults_file: str


def restore_encoders(model_dir: str, which: str, precise_bn_blocks: int | None = None) -> Encoders:
    """The run's model (`run_layout.restore`), defaults from its config.json; with
    precise_bn_blocks, the BN statistics of the backbone's last N blocks re-estimated on the
    run's training views first (`training.reestimate_batch_norm_on_training_views`, in
    batches of its last stage's size)."""
    model, checkpoint = run_layout.restore(model_dir, which)
    run_config = run_layout.load_run_config(model_dir)
    source = {"model_dir": model_dir, "checkpoint": checkpoint}
    if precise_bn_blocks:
        model.backbone.trainable = False
        training.reestimate_batch_norm_on_training_views(
            model.backbone, run_config,
            image_path.first_trainable_layer(model.backbone, blocks=precise_bn_blocks),
            run_config.stage_batch_size(run_config.stages[-1]))
        source["precise_bn_blocks"] = precise_bn_blocks
    defaults = {"shard_dir": run_config.shard_dir, "flip_images": run_config.eval_flip_images,
                "shift_texts": run_config.eval_shift_texts}
    return Encoders(model.image_encoder, model.text_encoder, False, model.config.image_size,
                    model.config.max_length, source,
                    defaults, os.path.join(model_dir, run_layout.RUN_CONFIG_NAME))


class SignatureEncoder:
    """A SavedModel signature of one input and {"embeddings": [B, D]}, called the way
    SplitEmbedder calls a Keras encoder (`training` is ignored: the graph is inference)."""

    def __init__(self, loaded, name: str, output_key: str):
        self.loaded = loaded  # keeps the SavedModel's variables alive
        self.signature = loaded.signatures[name]
        (self.input_name,) = self.signature.structured_input_signature[1]
        self.output_key = output_key

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.signature(**{self.input_name: inputs})[self.output_key]


EXPORT_INFO_KEYS = ("image_size", "max_length", "flip_images", "shift_texts", "shard_dir",
                    "checkpoint", "output_key")


def load_saved_model(saved_model: str) -> Encoders:
    """An exported SavedModel's encode_image_tensors and encode_token_ids, sizes and
    defaults from its export_info.json (ValueError naming it when it is unusable)."""
    info_path = os.path.join(saved_model, export.EXPORT_INFO_NAME)
    if not tf.io.gfile.exists(info_path):
        raise FileNotFoundError(f"{info_path} does not exist: {saved_model} is not a "
                                "dual-path-export SavedModel")
    with tf.io.gfile.GFile(info_path, "r") as info_file:
        try:
            info = json.loads(info_file.read())
        except json.JSONDecodeError as error:
            raise ValueError(f"{info_path}: not valid JSON: {error}") from error
    missing = [key for key in EXPORT_INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"{info_path}: no {', '.join(missing)}")
    loaded = tf.saved_model.load(saved_model)
    return Encoders(
        SignatureEncoder(loaded, "encode_image_tensors", info["output_key"]),
        SignatureEncoder(loaded, "encode_token_ids", info["output_key"]),
        bool(info["flip_images"]), int(info["image_size"]), int(info["max_length"]),
        {"saved_model": saved_model, "checkpoint": info["checkpoint"]},
        {name: info[name] for name in ("shard_dir", "flip_images", "shift_texts")}, info_path)


def resolve(name: str, value, encoders: Encoders):
    """The flag's value if given, else the run's recorded default."""
    if value is not None:
        return value
    logging.info("--%s=%s from %s", name, encoders.defaults[name], encoders.defaults_file)
    return encoders.defaults[name]


def evaluate(encoders: Encoders, shard_dir: str, split: str, protocol_name: str, *,
             flip_images: bool, shift_texts: bool,
             image_batch_size: int = embeddings.DEFAULT_IMAGE_BATCH,
             text_batch_size: int = embeddings.DEFAULT_TEXT_BATCH) -> dict:
    """Embeds the split, scores it by the protocol (protocols.AUTO resolved) and returns
    the results that the command writes, with the embedding and metric times in seconds.

    Raises ValueError when the split is not in the shards' manifest, or flip_images is
    False but the image encoder mirrors images."""
    if encoders.mirrors_images and not flip_images:
        raise ValueError(f"{encoders.defaults_file}: the export adds the mirrored image's "
                         "embedding, so it cannot be evaluated without it")
    manifest = input_pipeline.load_manifest(shard_dir)
    try:
        num_images = input_pipeline.split_count(manifest, split, input_pipeline.MANIFEST_NUM_IMAGES)
    except KeyError as error:
        splits = ", ".join(manifest.get(input_pipeline.MANIFEST_SPLITS, {}))
        raise ValueError(f"{shard_dir}: {error.args[0]} (its splits: {splits})") from error
    dataset_name = manifest.get("source", {}).get("dataset_name", "")
    if protocol_name == protocols.AUTO:
        protocol_name = protocols.auto_protocol(dataset_name, num_images)
    protocol = protocols.get_protocol(protocol_name)
    if protocol.expected_images not in (None, num_images):
        logging.warning("protocol %s is published on %d images; split %r has %d",
                        protocol.name, protocol.expected_images, split, num_images)

    start = time.perf_counter()
    embedder = embeddings.SplitEmbedder(
        encoders.image_encoder, encoders.text_encoder, image_size=encoders.image_size,
        max_length=encoders.max_length, flip_images=flip_images and not encoders.mirrors_images,
        shift_texts=shift_texts, image_batch_size=image_batch_size,
        text_batch_size=text_batch_size)
    split_embeddings = embedder(shard_dir, split)
    embed_seconds = time.perf_counter() - start

    start = time.perf_counter()
    text_labels = input_pipeline.read_captions(shard_dir, split).label
    scores = protocols.SplitScores(
        similarity=split_embeddings.image @ split_embeddings.text.T,
        image_of_text=split_embeddings.image_of_text,
        image_labels=protocols.image_labels(split_embeddings.image_of_text, text_labels,
                                            num_images, f"{shard_dir} ({split})"),
        text_labels=text_labels)
    metrics = protocol.metrics(scores)
    return {
        "protocol": protocol.name,
        "description": protocol.description,
        "dataset": dataset_name,
        "shard_dir": shard_dir,
        "split": split,
        "num_images": int(num_images),
        "num_captions": int(len(split_embeddings.text)),
        "embedding_dim": int(split_embeddings.image.shape[1]),
        **encoders.source,
        "flip_images": flip_images,
        "shift_texts": shift_texts,
        "metrics": metrics,
        "timing": {"embed_seconds": embed_seconds,
                   "metrics_seconds": time.perf_counter() - start},
    }


def default_output(split: str, protocol: str) -> str:
    precise_bn = f"_precise_bn_{FLAGS.precise_bn_blocks}" if FLAGS.precise_bn_blocks else ""
    name = f"eval_{split}_{protocol}{precise_bn}.json"
    if FLAGS.model_dir:
        return os.path.join(FLAGS.model_dir, name)
    return f"{FLAGS.saved_model.rstrip('/')}_{name}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    try:
        if FLAGS.precise_bn_blocks and not FLAGS.model_dir:
            raise ValueError("--precise_bn_blocks re-estimates a training run's statistics: give "
                             "--model_dir, not --saved_model")
        encoders = (restore_encoders(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.precise_bn_blocks)
                    if FLAGS.model_dir
                    else load_saved_model(FLAGS.saved_model))
        load_seconds = time.perf_counter() - start
        flip_images = resolve("flip_images", FLAGS.flip_images, encoders)
        shift_texts = resolve("shift_texts", FLAGS.shift_texts, encoders)
        results = evaluate(encoders, resolve("shard_dir", FLAGS.shard_dir, encoders), FLAGS.split,
                           FLAGS.protocol, flip_images=flip_images, shift_texts=shift_texts,
                           image_batch_size=FLAGS.image_batch_size,
                           text_batch_size=FLAGS.text_batch_size)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"dual-path-evaluate: error: {error}")
    results["flags"] = commands.flag_values_dict(FLAGS, sys.modules[__name__])
    results["timing"] = {"load_seconds": load_seconds, **results["timing"],
                         "total_seconds": time.perf_counter() - start}
    output = FLAGS.output or default_output(FLAGS.split, results["protocol"])
    run_layout.write_json_atomically(output, results)

    print(f"protocol {results['protocol']}: {results['description']}")
    print(f"{results['dataset']} {FLAGS.split}: {results['num_images']} images, "
          f"{results['num_captions']} captions; flip_images={flip_images}, "
          f"shift_texts={shift_texts}")
    print(f"model: {results.get('saved_model') or results['checkpoint']}")
    print("\n".join(tables.protocol_table(results["protocol"], results["metrics"])))
    print(f"written to {output}", flush=True)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
