"""Builds a dataset's shards, vocabulary and word2vec init from any source format.

  dual-path-build-shards --source_format=flickr_tokens \\
      --captions=Flickr8k_text/Flickr8k.token.txt --image_root=Flicker8k_Dataset \\
      --split_files=train=Flickr8k_text/Flickr_8k.trainImages.txt,dev=... \\
      --shard_dir=/data/flickr8k_shards

Writes into --shard_dir, in this order:

1. nothing until every image of every split is decoded once (in --num_workers
   processes) and every caption is encoded, so that --strict stops on the first
   skippable problem (naming the file and the reason) before anything is written;
2. vocab.txt (train captions only, --min_word_count) and word2vec_init.npy
   (float32 [vocab_size, dim], from --word2vec: word2vec trained on the train captions at
   --embedding_dim, or a word vectors file, whose dim it takes; see data_prep/word2vec.py);
3. the image and caption shards (`dual_path.shard_format`); complete, unchanged
   shards of an earlier run are kept;
4. manifest.json, last: source, counts per split, what was skipped and why, what was
   converted, every shard's record count and sha256, and the command line.

Labels: an image without a person id is its own class (its index in the split); person
ids (CUHK-PEDES) become dense classes 0..K-1 in sorted id order, in every split. A caption
that encodes to no token is skipped, and so is an image left with no caption.
"""
import collections
import io
import json
import logging as std_logging
import os
import shlex
import sys
import time
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from data_prep import images, readers, shard_writer, word2vec
from data_prep.records import DataFormatError, ImageRecord, Skipped, SourceDataset, skip_or_raise
from dual_path import shard_format, text
from dual_path.atomic_write import write_atomically

WORD2VEC_TRAIN = "train"
DEFAULT_EMBEDDING_DIM = 300
STAGE_READER = "reader"
STAGE_IMAGE = "image"
STAGE_CAPTION = "caption"
REASON_NO_WORDS = "caption has no words"
REASON_NO_KNOWN_WORDS = "no word of the caption is in the vocabulary"
REASON_NO_CAPTION_LEFT = "no caption of the image is left"


def _person_id_order(person_id: str):
    """Sorts numeric ids as numbers ("2" before "10"), others as strings after them."""
    return (0, int(person_id), person_id) if person_id.isdigit() else (1, 0, person_id)


def instance_labels(records: Sequence[ImageRecord], split: str) -> tuple[list[int], int]:
    """The instance class of each image (records in index order) and the class count.

    The image index when no record has a label; else (CUHK-PEDES person ids) the rank of
    the record's person id among the split's sorted distinct ids, in every split, so that
    person-search evaluation can match any image of the same person.
    Raises:
      DataFormatError: a split where only some records have a person id.
    """
    if all(record.label is None for record in records):
        return list(range(len(records))), len(records)
    unlabelled = [record for record in records if record.label is None]
    if unlabelled:
        raise DataFormatError(
            f"{unlabelled[0].path}: no person id, while other {split} images have one"
        )
    person_ids = sorted({record.label for record in records}, key=_person_id_order)
    dense_id = {person_id: class_id for class_id, person_id in enumerate(person_ids)}
    return [dense_id[record.label] for record in records], len(person_ids)


def _load_word_vectors(word2vec_source: str, embedding_dim: int | None, file_format: str):
    """Pretrained vectors from a file, checked against embedding_dim (None: any) and their
    format (one of word2vec.FORMATS, AUTO resolved); (None, None) for "train"."""
    if word2vec_source == WORD2VEC_TRAIN:
        return None, None
    if file_format == word2vec.AUTO:
        file_format = word2vec.detect_format(word2vec_source)
    vectors = word2vec.load_word_vectors(word2vec_source, file_format)
    if embedding_dim is not None and vectors.vector_size != embedding_dim:
        raise DataFormatError(
            f"{word2vec_source}: vectors have dim {vectors.vector_size}, "
            f"--embedding_dim is {embedding_dim} (leave it unset to take the file's)"
        )
    return vectors, file_format


def _save_npy(path: str, matrix: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, matrix)
    write_atomically(path, buffer.getvalue())


def _encode_captions(
    records: Sequence[ImageRecord],
    tokenized: Sequence[Sequence[list[str]]],
    vocabulary: text.Vocabulary,
    max_length: int,
    oov: str,
    skipped: list[Skipped],
    strict: bool,
) -> list[list[tuple[tuple[int, ...], str]]]:
    """Per record, its (token ids, raw caption) pairs; tokenized holds each record's
    tokenized captions. Captions that encode to no token are skipped (a record can be
    left with none)."""
    encoded = []
    for record, record_tokens in zip(records, tokenized):
        usable = []
        for number, (caption, tokens) in enumerate(zip(record.captions, record_tokens)):
            token_ids = vocabulary.encode(tokens, max_length, oov)
            if not token_ids:
                reason = REASON_NO_KNOWN_WORDS if tokens else REASON_NO_WORDS
                skip_or_raise(skipped, f"{record.path} caption {number}", reason, strict)
                continue
            usable.append((tuple(token_ids), caption))
        encoded.append(usable)
    return encoded


def _skip_items(stage: str, skipped: Sequence[Skipped]) -> list[dict]:
    return [{"stage": stage, "item": skip.item, "reason": skip.reason} for skip in skipped]


def _check_images(records, shard_dir, pool, image_skips, strict) -> dict[str, list]:
    """Phase 1 of every split: {split: [(position in split, record, ImageCheck)] of the
    images that passed}; the others go to image_skips[split] (under strict, the first
    one raises once every split is checked)."""
    checks = {
        split: shard_writer.check_split_images(split_records, shard_dir, split, pool)
        for split, split_records in records.items()
    }
    kept_checks = {split: [] for split in records}
    for split, split_records in records.items():
        for position, (record, check) in enumerate(zip(split_records, checks[split])):
            if check.ok:
                kept_checks[split].append((position, record, check))
            else:
                skip_or_raise(image_skips[split], record.path, check.reason, strict)
    return kept_checks


def _image_entries(split, kept_checks, labels, shard_dir) -> list[shard_writer.ImageEntry]:
    """Image entries in index order; converted images are read from phase 1's cache."""
    entries = []
    for index, ((position, record, check), label) in enumerate(zip(kept_checks, labels)):
        jpeg_path = record.path
        if check.conversion:
            jpeg_path = shard_writer.converted_path(shard_dir, split, position)
        entries.append(
            shard_writer.ImageEntry(
                source_id=record.image_id,
                filename=os.path.basename(record.path),
                jpeg_path=jpeg_path,
                height=check.height,
                width=check.width,
                label=label,
                index=index,
                file_stamp=shard_writer.file_stamp(record.path),
            )
        )
    return entries


def _coverage(coverage: word2vec.Coverage) -> dict:
    """The manifest's coverage: through case variants (what the init matrix copies), and
    of the words as the vocabulary holds them."""
    return {
        "found_words": coverage.found_words,
        "total_words": coverage.total_words,
        "word_fraction": coverage.word_fraction,
        "token_fraction": coverage.token_fraction,
        "as_is": {
            "found_words": coverage.found_words_as_is,
            "word_fraction": coverage.found_words_as_is / max(coverage.total_words, 1),
            "token_fraction": coverage.found_tokens_as_is / max(coverage.total_tokens, 1),
        },
    }


def build_shards(
    source: SourceDataset,
    shard_dir: str,
    *,
    splits: Sequence[str] = shard_format.SPLITS,
    num_image_shards: int = 16,
    num_caption_shards: int = 4,
    num_workers: int | None = None,
    min_word_count: int = 1,
    oov: str = "drop",
    max_length: int | None = None,
    word2vec_source: str = WORD2VEC_TRAIN,
    embedding_dim: int | None = None,
    word_vectors_format: str = word2vec.AUTO,
    seed: int = 0,
    strict: bool = False,
    source_format: str = "",
    source_files: Sequence[str] = (),
    command_line: str | None = None,
) -> dict:
    """Writes shards, vocab.txt, word2vec_init.npy and manifest.json into shard_dir.

    Args:
      source: the dataset, from `data_prep.readers.read_source` or built directly.
      shard_dir: output folder (created); an interrupted build resumes in it.
      splits: the splits to build, train included; a split without records gets no shards.
      num_image_shards, num_caption_shards: shards per split (fewer for fewer records).
      num_workers: processes that decode and write; None: one per CPU; 1: none.
      min_word_count: train-caption count a word needs to enter the vocabulary.
      oov: "drop" or "unk", for words outside the vocabulary (`text.Vocabulary.encode`).
      max_length: tokens kept per caption; None: source.max_length.
      word2vec_source: "train" (train on the train captions) or a word vectors file.
      embedding_dim: word vector size; None: the file's, or DEFAULT_EMBEDDING_DIM for
        "train". A value that contradicts the file's raises before anything is written.
      word_vectors_format: the file's format, one of word2vec.FORMATS (auto: detected).
      seed: seeds word2vec training and the random rows of the init matrix.
      strict: any skippable problem raises DataFormatError before anything is written.
      source_format, source_files: recorded in the manifest.
      command_line: recorded in the manifest; None: this process's command line.
    Returns:
      The manifest (as written to `shard_format.manifest_path(shard_dir)`).
    Raises:
      DataFormatError: unusable input (named file and reason), or any skip under strict.
      ValueError: bad arguments.
    """
    unknown_splits = sorted(set(splits) - set(shard_format.SPLITS))
    if unknown_splits or "train" not in splits:
        raise ValueError(f"splits must include train and be among {shard_format.SPLITS}, got {list(splits)}")
    if oov not in text.OOV_MODES:
        raise ValueError(f"oov must be one of {text.OOV_MODES}, got {oov!r}")
    max_length = max_length or source.max_length
    if strict and source.skipped:
        raise DataFormatError(f"{source.skipped[0].item}: {source.skipped[0].reason}")
    pretrained_vectors, word_vectors_format = _load_word_vectors(
        word2vec_source, embedding_dim, word_vectors_format)
    if pretrained_vectors is not None:
        embedding_dim = pretrained_vectors.vector_size
    embedding_dim = embedding_dim or DEFAULT_EMBEDDING_DIM
    records = {split: source.split(split) for split in splits}
    if not records["train"]:
        raise DataFormatError(f"{source.name}: no train images; vocabulary and word2vec need them")

    image_skips = {split: [] for split in splits}
    caption_skips = {split: [] for split in splits}
    tf.io.gfile.makedirs(shard_dir)
    # An earlier build's manifest must not describe this build's half-written files.
    if tf.io.gfile.exists(shard_format.manifest_path(shard_dir)):
        tf.io.gfile.remove(shard_format.manifest_path(shard_dir))
    with shard_writer.WorkerPool(num_workers) as pool:
        start = time.monotonic()
        kept_checks = _check_images(records, shard_dir, pool, image_skips, strict)
        logging.info("checked %d images in %.1f s", sum(map(len, records.values())), time.monotonic() - start)
        tokenized = {
            split: [[text.tokenize(caption) for caption in record.captions] for _, record, _ in kept]
            for split, kept in kept_checks.items()
        }
        train_tokens = [tokens for record_tokens in tokenized["train"] for tokens in record_tokens]
        vocabulary = text.Vocabulary.build(train_tokens, min_word_count)
        if not vocabulary.words:
            raise DataFormatError(f"{source.name}: the train captions hold no words")

        tasks, counts, num_classes = [], {}, 0
        for split in splits:
            encoded = _encode_captions(
                [record for _, record, _ in kept_checks[split]], tokenized[split],
                vocabulary, max_length, oov, caption_skips[split], strict,
            )
            for (_, record, _), captions in zip(kept_checks[split], encoded):
                if not captions:
                    skip_or_raise(image_skips[split], record.path, REASON_NO_CAPTION_LEFT, strict)
            kept_checks[split] = [kept for kept, captions in zip(kept_checks[split], encoded) if captions]
            encoded = [captions for captions in encoded if captions]
            labels, split_classes = instance_labels([record for _, record, _ in kept_checks[split]], split)
            num_classes = split_classes if split == "train" else num_classes
            image_entries = _image_entries(split, kept_checks[split], labels, shard_dir)
            caption_entries = []
            for image_index, captions in enumerate(encoded):
                for token_ids, caption in captions:
                    caption_entries.append(shard_writer.CaptionEntry(
                        token_ids, caption, len(caption_entries), image_index, labels[image_index]))
            tasks += shard_writer.plan_image_shards(shard_dir, split, image_entries, num_image_shards)
            tasks += shard_writer.plan_caption_shards(shard_dir, split, caption_entries, num_caption_shards)
            counts[split] = {
                "images": len(image_entries),
                "captions": len(caption_entries),
                "skipped_images": len(image_skips[split]),
                "skipped_captions": len(caption_skips[split]),
            }

        vocabulary.save(text.vocabulary_path(shard_dir))
        start = time.monotonic()
        vectors = pretrained_vectors or word2vec.train_word2vec(train_tokens, dim=embedding_dim, seed=seed)
        init_matrix, coverage = word2vec.init_matrix(vocabulary, vectors, seed=seed)
        _save_npy(text.word2vec_init_path(shard_dir), init_matrix)
        logging.info("word2vec init (%s) in %.1f s, coverage %s", word2vec_source, time.monotonic() - start, coverage)
        start = time.monotonic()
        shard_infos = shard_writer.write_shards(tasks, shard_dir, splits, pool)
    kept_shards = sum(not info.written for info in shard_infos)
    logging.info(
        "%d shards written, %d kept from an earlier run, in %.1f s",
        len(shard_infos) - kept_shards, kept_shards, time.monotonic() - start,
    )

    skipped_items = _skip_items(STAGE_READER, source.skipped)
    for split in splits:
        skipped_items += _skip_items(STAGE_IMAGE, image_skips[split])
        skipped_items += _skip_items(STAGE_CAPTION, caption_skips[split])
    conversions = collections.Counter(
        check.conversion for split in splits for _, _, check in kept_checks[split]
    )
    manifest = {
        "source": {"format": source_format, "files": list(source_files), "dataset_name": source.name},
        "splits": counts,
        "num_classes": num_classes,
        "vocab_size": vocabulary.size,
        "min_word_count": min_word_count,
        "max_length": max_length,
        "oov": oov,
        "embedding": {"dim": embedding_dim, "word2vec": word2vec_source,
                      "format": word_vectors_format or WORD2VEC_TRAIN, "coverage": _coverage(coverage)},
        "skipped": {
            "counts": dict(collections.Counter(item["reason"] for item in skipped_items)),
            "items": skipped_items,
        },
        "converted": {kind: conversions[kind] for kind in images.CONVERSIONS},
        "shards": [{"file": info.file, "records": info.records, "sha256": info.sha256} for info in shard_infos],
        "command": command_line if command_line is not None else shlex.join(sys.argv),
    }
    write_atomically(
        shard_format.manifest_path(shard_dir), json.dumps(manifest, indent=2).encode("utf-8")
    )
    for reason, count in manifest["skipped"]["counts"].items():
        logging.warning("skipped %d: %s", count, reason)
    return manifest


def summary(manifest: dict) -> str:
    """A few lines for the console: counts per split, skips and conversions."""
    lines = [f"dataset {manifest['source']['dataset_name']}: vocabulary {manifest['vocab_size']} ids, "
             f"{manifest['num_classes']} train classes"]
    for split, counts in manifest["splits"].items():
        lines.append(
            f"  {split}: {counts['images']} images, {counts['captions']} captions "
            f"(skipped {counts['skipped_images']} images, {counts['skipped_captions']} captions)"
        )
    skip_counts = manifest["skipped"]["counts"]
    if skip_counts:
        lines.append("  skipped: " + ", ".join(f"{count} {reason}" for reason, count in skip_counts.items()))
    converted = {kind: count for kind, count in manifest["converted"].items() if count}
    if converted:
        lines.append("  converted to RGB JPEG: " + ", ".join(f"{n} {kind}" for kind, n in converted.items()))
    embedding = manifest["embedding"]
    coverage = embedding["coverage"]
    lines.append(
        f"  word vectors: {embedding['dim']}-d from {embedding['word2vec']} ({embedding['format']}); "
        f"{coverage['token_fraction']:.1%} of caption tokens found ({coverage['as_is']['token_fraction']:.1%} "
        "as written)")
    lines.append(f"  {len(manifest['shards'])} shard files")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags; called by run() only, so that importing this module
    (for build_shards()) defines no flags that other commands' flags would collide with."""
    flags.DEFINE_enum("source_format", None, sorted(readers.FORMATS), "Format the dataset ships in.")
    flags.DEFINE_string("captions", None, "Caption file(s) (see data_prep/readers/__init__.py).")
    flags.DEFINE_string("image_root", None, "Image folder(s); default: the caption file's folder.")
    flags.DEFINE_string("split_files", None, "Split lists: 'train=PATH,dev=PATH' (flickr_tokens) or PATH (coco).")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir (tfds_coco).")
    flags.DEFINE_string("dataset_name", None, "Name recorded in the manifest; default: the reader's.")
    flags.DEFINE_string("shard_dir", None, "Output folder.")
    flags.DEFINE_list("splits", list(shard_format.SPLITS), "Splits to build; train is required.")
    flags.DEFINE_integer("num_image_shards", 16, "Image shards per split.", lower_bound=1)
    flags.DEFINE_integer("num_caption_shards", 4, "Caption shards per split.", lower_bound=1)
    flags.DEFINE_integer("num_workers", None, "Worker processes; default: one per CPU.", lower_bound=1)
    flags.DEFINE_integer("min_word_count", 1, "Train-caption count a word needs to be in the vocabulary.", lower_bound=1)
    flags.DEFINE_enum("oov", "drop", list(text.OOV_MODES), "Words outside the vocabulary: drop or map to <unk>.")
    flags.DEFINE_integer("max_length", None, "Tokens kept per caption; default: the dataset's.", lower_bound=1)
    flags.DEFINE_string("word2vec", WORD2VEC_TRAIN,
                        "'train' (on the train captions) or a word vectors file: word2vec .bin or "
                        ".txt, fastText .vec, GloVe .txt (optionally .gz).")
    flags.DEFINE_enum("word_vectors_format", word2vec.AUTO, list(word2vec.FORMATS),
                      "Format of the --word2vec file; auto: told from its first lines.")
    flags.DEFINE_integer("embedding_dim", None,
                         f"Word vector size; default: the --word2vec file's ({DEFAULT_EMBEDDING_DIM} "
                         "for 'train'). A value that contradicts the file's is an error.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of word2vec training and the init matrix's random rows.")
    flags.DEFINE_boolean("strict", False, "Stop at the first skippable problem instead of skipping it.")
    flags.mark_flags_as_required(["source_format", "shard_dir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # gensim logs each word2vec epoch at INFO, which absl would print.
    std_logging.getLogger("gensim").setLevel(std_logging.WARNING)
    source_files = [FLAGS[name].value for name in ("captions", "image_root", "split_files", "tfds_data_dir")]
    try:
        source = readers.read_source(
            FLAGS.source_format,
            captions=FLAGS.captions,
            image_root=FLAGS.image_root,
            split_files=FLAGS.split_files,
            tfds_data_dir=FLAGS.tfds_data_dir,
            dataset_name=FLAGS.dataset_name,
            strict=FLAGS.strict,
        )
        manifest = build_shards(
            source,
            FLAGS.shard_dir,
            splits=FLAGS.splits,
            num_image_shards=FLAGS.num_image_shards,
            num_caption_shards=FLAGS.num_caption_shards,
            num_workers=FLAGS.num_workers,
            min_word_count=FLAGS.min_word_count,
            oov=FLAGS.oov,
            max_length=FLAGS.max_length,
            word2vec_source=FLAGS.word2vec,
            embedding_dim=FLAGS.embedding_dim,
            word_vectors_format=FLAGS.word_vectors_format,
            seed=FLAGS.seed,
            strict=FLAGS.strict,
            source_format=FLAGS.source_format,
            source_files=[value for value in source_files if value],
        )
    except (DataFormatError, ValueError) as error:
        sys.exit(f"dual-path-build-shards: error: {error}")
    print(summary(manifest))


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
