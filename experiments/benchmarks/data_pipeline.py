"""Times the data path side by side on the same images (run by hand, not a test).

For the images of a raw dataset (default: ../shared's Flickr8k, train + dev, 7,000 images;
--max_images keeps the first ones, train first), in one run:

1. raw JPEG decode: tf.io.read_file + tf.io.decode_jpeg of the image files in tf.data
   with AUTOTUNE parallelism (after one untimed pass that also warms the page cache);
2. shard building: `data_prep.build_shards.build_shards` of those images (all their splits)
   into an empty shard folder, end to end: the one decode check of every image, the
   vocabulary, word2vec training (--embedding_dim) and init matrix, the shard writing;
   the word2vec training is then timed again on its own, to show its share;
3. training input: `dual_path.input_pipeline.train_dataset` over the shards just
   written (random crop decode, resize, flip, caption choice), after --warmup_batches.

    python -m experiments.benchmarks.data_pipeline
    python -m experiments.benchmarks.data_pipeline --max_images=500
    python -m experiments.benchmarks.data_pipeline \\
        --output_json=experiments/results/benchmarks/data_pipeline.json
    python -m experiments.benchmarks.data_pipeline --source_format=karpathy \\
        --captions=dataset_flickr30k.json --split_files= \\
        --image_root=flickr30k-images --shard_dir=/tmp/shards

The defaults finish in a few minutes on 2 cores.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

import tensorflow as tf

from data_prep import build_shards, readers, word2vec
from data_prep.records import DataFormatError, SourceDataset
from dual_path import input_pipeline, shard_format, text
from experiments.benchmarks import report


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_raw_dataset_arguments(parser, splits=("train", "dev"))
    parser.add_argument("--shard_dir", help="empty folder for the shards (kept); default: a temporary one, removed")
    parser.add_argument("--max_images", type=int, help="images timed in every stage; default: all")
    parser.add_argument("--num_workers", type=int, help="build_shards worker processes; default: one per CPU")
    parser.add_argument("--embedding_dim", type=int, default=build_shards.DEFAULT_EMBEDDING_DIM,
                        help="word2vec size in build_shards")
    parser.add_argument("--batch_size", type=int, default=32, help="train_dataset batch size")
    parser.add_argument("--image_size", type=int, default=224, help="train_dataset image side in pixels")
    parser.add_argument("--warmup_batches", type=int, default=3, help="train_dataset batches left out of the timing")
    parser.add_argument("--timed_batches", type=int, default=100, help="train_dataset batches timed")
    report.add_output_argument(parser)
    args = parser.parse_args()
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max_images must be at least 1")
    for name in ("embedding_dim", "batch_size", "image_size", "timed_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup_batches < 0 or (args.num_workers is not None and args.num_workers < 1):
        parser.error("--warmup_batches must be >= 0 and --num_workers >= 1")
    return args


def _subset(source: SourceDataset, max_images: int | None) -> SourceDataset:
    """The first max_images records (all for None), train first: shards need a train split."""
    ordered = sorted(source.records, key=lambda record: shard_format.SPLITS.index(record.split))
    records = ordered[:max_images]
    if not records or records[0].split != "train":
        sys.exit(f"{source.name}: the source has no train images")
    return SourceDataset(name=source.name, records=records, max_length=source.max_length)


def time_jpeg_decode(paths: Sequence[str]) -> float:
    """Seconds for tf.data to read and decode every file once (the second of two passes)."""
    decoded_shapes = tf.data.Dataset.from_tensor_slices(list(paths)).map(
        lambda path: tf.shape(tf.io.decode_jpeg(tf.io.read_file(path), channels=3)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    count = int(decoded_shapes.reduce(0, lambda total, _: total + 1))
    if count != len(paths):
        raise RuntimeError(f"decoded {count} of {len(paths)} images")
    start = time.perf_counter()
    decoded_shapes.reduce(0, lambda total, _: total + 1).numpy()
    return time.perf_counter() - start


def time_build_shards(args: argparse.Namespace, source: SourceDataset, shard_dir: str) -> tuple[float, dict]:
    """Seconds of one build_shards call on the source's splits, and its manifest."""
    start = time.perf_counter()
    manifest = build_shards.build_shards(
        source,
        shard_dir,
        splits=sorted({record.split for record in source.records}, key=shard_format.SPLITS.index),
        num_workers=args.num_workers,
        embedding_dim=args.embedding_dim,
        source_format=args.source_format,
        command_line="python -m experiments.benchmarks.data_pipeline",
    )
    return time.perf_counter() - start, manifest


def time_word2vec(args: argparse.Namespace, source: SourceDataset) -> float:
    """Seconds of the word2vec training that build_shards does on the same captions."""
    token_lists = [text.tokenize(caption) for record in source.split("train") for caption in record.captions]
    start = time.perf_counter()
    word2vec.train_word2vec(token_lists, dim=args.embedding_dim, seed=0)
    return time.perf_counter() - start


def time_train_dataset(args: argparse.Namespace, shard_dir: str, max_length: int) -> float:
    """Seconds for --timed_batches batches of train_dataset after --warmup_batches."""
    dataset = input_pipeline.train_dataset(
        shard_dir, batch_size=args.batch_size, image_size=args.image_size, max_length=max_length, seed=0
    )
    batches = iter(dataset)
    for _ in range(args.warmup_batches):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.timed_batches):
        next(batches)["image"].numpy()
    return time.perf_counter() - start


def _row(stage: str, count: int, unit: str, seconds: float) -> str:
    return f"{stage:<56}{count:>7} {unit:<9}{seconds:>9.2f}{count / seconds:>12.1f}"


def main() -> None:
    args = _parse_args()
    try:
        source = readers.read_source(
            args.source_format, captions=args.captions, image_root=args.image_root, split_files=args.split_files
        )
    except (DataFormatError, ValueError) as error:
        sys.exit(f"data_pipeline: error: {error}")
    subset = _subset(source, args.max_images)
    num_images = len(subset.records)

    shard_dir = args.shard_dir or tempfile.mkdtemp(prefix="dual_path_benchmark_")
    if tf.io.gfile.glob(os.path.join(shard_dir, "*" + shard_format.SHARD_SUFFIX)):
        sys.exit(f"{shard_dir} already holds shards: build_shards would keep them and time nothing")
    try:
        decode_seconds = time_jpeg_decode([record.path for record in subset.records])
        build_seconds, manifest = time_build_shards(args, subset, shard_dir)
        word2vec_seconds = time_word2vec(args, subset)
        pipeline_seconds = time_train_dataset(args, shard_dir, manifest["max_length"])
    finally:
        if not args.shard_dir:
            shutil.rmtree(shard_dir, ignore_errors=True)

    splits = manifest["splits"]
    written = {count: sum(split[count] for split in splits.values()) for count in ("images", "captions")}
    print(
        f"\n{num_images} images of {source.name} ("
        + ", ".join(f"{name} {split['images']}" for name, split in splits.items())
        + f"; {written['captions']} captions), {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}"
    )
    print(f"{'stage':<56}{'count':>7} {'':<9}{'seconds':>9}{'per second':>12}")
    print(_row("raw JPEG: tf.io.read_file + decode_jpeg, tf.data AUTOTUNE", num_images, "images", decode_seconds))
    print(_row(
        f"build_shards: check, vocab, word2vec {args.embedding_dim}-d, write",
        written["images"], "images", build_seconds,
    ))
    print(_row("  of which word2vec training on train captions (timed alone)", written["images"], "images",
               word2vec_seconds))
    print(_row(
        f"train_dataset: batch {args.batch_size}, {args.image_size} px, crop + flip",
        args.batch_size * args.timed_batches, "examples", pipeline_seconds,
    ))

    if args.output_json:
        figures = {
            "raw_jpeg_decode_images_per_s": num_images / decode_seconds,
            "build_shards_images_per_s": written["images"] / build_seconds,
            "build_shards_seconds": build_seconds,
            "word2vec_seconds": word2vec_seconds,
            "train_dataset_examples_per_s": args.batch_size * args.timed_batches / pipeline_seconds,
        }
        ratios = {
            "train_dataset_over_raw_jpeg_decode":
                figures["train_dataset_examples_per_s"] / figures["raw_jpeg_decode_images_per_s"],
            "word2vec_share_of_build_shards": word2vec_seconds / build_seconds,
        }
        settings = {**vars(args), "images": num_images, "written_images": written["images"],
                    "written_captions": written["captions"], "dataset": source.name}
        report.write_report(args.output_json, "data_pipeline", figures, ratios, settings)


if __name__ == "__main__":
    main()
