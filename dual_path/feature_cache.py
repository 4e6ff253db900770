"""A cache of the frozen image backbone's features of augmented training views (stage I).

In stage I the backbone is frozen, weights and BatchNorm statistics, so its output for a given
crop never changes: computing it once per view, instead of once per step, makes stage I cost
only the text path and the heads. The augmentation stays that of `input_pipeline.train_dataset`
(random-resized crop, flip with the caption's left/right swapped) with one difference: every
image has a fixed set of V views, drawn once, and each epoch uses one of them at random, where
the uncached pipeline draws a new crop every epoch. V is `--stage1_feature_views`.

On disk, under the cache folder, one subfolder per cache key:
  <key>/features.npy   float32 [N, V, F]   pooled backbone features of view v of image i
  <key>/flipped.npy    bool [N, V]         whether that view was mirrored
  <key>/cache.json     what the key was computed from
The key is a digest of everything the features depend on: the split's image shards (their
names and sha256 in the manifest, so shards rebuilt with other word vectors or another
vocabulary share the cache), the backbone's architecture and weight values, the view count,
image size, seed, flip mode and crop ranges. Runs with the same backbone and images (the
ablations) share one cache; a folder is written under a temporary name and renamed into place,
so a killed run never leaves a partial cache in use (its temporary folder is deleted by the next run that computes the same key).
"""
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dual_path import input_pipeline, shard_format

FEATURES_FILE = "features.npy"
FLIPPED_FILE = "flipped.npy"
KEY_FILE = "cache.json"
_EMBED_BATCH = 64


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """Backbone features of V augmented views of every image of a split.

    features: float32 [N, V, F], memory-mapped from the cache folder.
    flipped: bool [N, V].
    directory: the cache folder they were read from.
    """

    features: np.ndarray
    flipped: np.ndarray
    directory: str


def _backbone_digest(backbone: keras.Model) -> str:
    """sha256 of the backbone's layer configuration and weight values."""
    digest = hashlib.sha256(json.dumps(backbone.get_config(), sort_keys=True, default=str).encode())
    for weight in backbone.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def cache_key(backbone: keras.Model, shard_dir: str, *, split: str, views: int, image_size: int,
              seed: int, flip: str, crop_area: tuple[float, float],
              crop_aspect: tuple[float, float]) -> dict:
    """Everything the cached features depend on, as a JSON-able dict with its digest in "key"."""
    image_shards = [[shard["file"], shard["sha256"]]
                    for shard in input_pipeline.load_manifest(shard_dir)["shards"]
                    if shard["file"].startswith(f"{split}-{shard_format.IMAGES}-")]
    if not image_shards:
        raise ValueError(f"{shard_format.manifest_path(shard_dir)}: no image shards of split {split!r}")
    parts = {"image_shards_sha256": hashlib.sha256(json.dumps(image_shards).encode()).hexdigest(),
             "split": split, "backbone_sha256": _backbone_digest(backbone),
             "views": views, "image_size": image_size, "seed": seed, "flip": flip,
             "crop_area": list(crop_area), "crop_aspect": list(crop_aspect)}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"key": key, **parts}


def _load(directory: str) -> FeatureCache:
    features = np.load(os.path.join(directory, FEATURES_FILE), mmap_mode="r")
    flipped = np.load(os.path.join(directory, FLIPPED_FILE))
    if features.ndim != 3 or flipped.shape != features.shape[:2]:
        raise ValueError(f"{directory}: feature cache of shapes {features.shape} and {flipped.shape} "
                         f"is damaged: delete the folder to compute it again")
    return FeatureCache(features=features, flipped=flipped, directory=directory)


def _remove_abandoned(directory: str) -> None:
    """Deletes `<directory>.partial-<pid>` folders whose process is gone (a killed run's)."""
    for partial in glob.glob(f"{glob.escape(directory)}.partial-*"):
        try:
            os.kill(int(partial.rsplit("-", 1)[1]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            logging.info("feature cache: removing %s, left by a run that was killed", partial)
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            continue


def load_or_compute(backbone: keras.Model, shard_dir: str, cache_dir: str, *, views: int, image_size: int,
                    seed: int, flip: str = "swap_left_right", split: str = "train",
                    crop_area: tuple[float, float] = (0.8, 1.0),
                    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3),
                    progress_every_s: float = 60.0) -> FeatureCache:
    """The cached features of the split's augmented views, computed first if not cached yet.

    Args:
      backbone: the frozen image CNN (float32 [B, S, S, 3] RGB 0..255 -> [B, F]); run in
        inference mode, as stage I runs it.
      shard_dir: the split's shards; cache_dir: the cache folder (a local path).
      views, image_size, seed, flip, crop_area, crop_aspect: as `input_pipeline.augmented_view_dataset`.
      progress_every_s: while computing, log the views done, their rate and the time left at
        most this often (seconds): a cache takes minutes on a CPU.
    """
    key = cache_key(backbone, shard_dir, split=split, views=views, image_size=image_size, seed=seed,
                    flip=flip, crop_area=crop_area, crop_aspect=crop_aspect)
    directory = os.path.join(cache_dir, key["key"])
    if os.path.isfile(os.path.join(directory, KEY_FILE)):
        logging.info("feature cache: reusing %s", directory)
        return _load(directory)

    num_images = input_pipeline.split_count(input_pipeline.load_manifest(shard_dir), split)
    views_dataset = input_pipeline.augmented_view_dataset(
        shard_dir, views=views, batch_size=_EMBED_BATCH, image_size=image_size, seed=seed, flip=flip,
        crop_area=crop_area, crop_aspect=crop_aspect, split=split)
    embed = tf.function(lambda images: backbone(images, training=False))
    _remove_abandoned(directory)
    partial = f"{directory}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    features = None
    flipped = np.zeros([num_images, views], bool)
    seen = np.zeros([num_images, views], bool)
    start = last_progress = time.monotonic()
    for batch in views_dataset:
        rows = embed(batch["image"]).numpy()
        if features is None:
            features = np.lib.format.open_memmap(os.path.join(partial, FEATURES_FILE), mode="w+",
                                                 dtype=np.float32, shape=(num_images, views, rows.shape[1]))
        image_index, view = batch["image_index"].numpy(), batch["view"].numpy()
        if image_index.max() >= num_images:
            raise ValueError(f"{shard_dir} ({split}): image index {image_index.max()} but the manifest "
                             f"counts {num_images} images")
        features[image_index, view] = rows
        flipped[image_index, view] = batch["flipped"].numpy()
        seen[image_index, view] = True
        now = time.monotonic()
        if now - last_progress >= progress_every_s:
            last_progress = now
            done, total = int(seen.sum()), num_images * views
            rate = done / (now - start)
            logging.info("feature cache: %d of %d views (%.1f views/s, about %.1f min left)", done,
                         total, rate, (total - done) / rate / 60)
    if features is None or not seen.all():
        raise ValueError(f"{shard_dir} ({split}): the image shards hold {int(seen.sum()) // views} of the "
                         f"{num_images} images the manifest counts")
    features.flush()
    del features
    np.save(os.path.join(partial, FLIPPED_FILE), flipped)
    with open(os.path.join(partial, KEY_FILE), "w") as key_file:
        json.dump(key, key_file, indent=1, sort_keys=True)
    try:
        os.rename(partial, directory)
    except OSError:
        # Another run finished the same cache first: its copy is the same, keep it.
        shutil.rmtree(partial, ignore_errors=True)
        if not os.path.isfile(os.path.join(directory, KEY_FILE)):
            raise
    logging.info("feature cache: %d images x %d views in %.1f s -> %s", num_images, views,
                 time.monotonic() - start, directory)
    return _load(directory)
