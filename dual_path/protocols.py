"""The published evaluation protocols, as named pieces: which metric, on which part of a split.

  flickr_1k   every image of the split against all the split's captions, one fold
              (Flickr8k / Flickr30k: 1,000 test images, 5 captions each)
  coco_1k     the split's images in 5 consecutive folds, each against its own captions,
              the metrics averaged (MSCOCO 1K: 5 folds of the 5,000 test images)
  coco_5k     all 5,000 MSCOCO test images against all their captions, one fold
  cuhk_pedes  text -> image person search: top-1/5/10 and mAP, every image of the
              query's person id a match (person ids: the shards' "label")

A protocol is a `Protocol` in `PROTOCOLS`; `auto_protocol` picks one from the
manifest's dataset name and the split's size. Inputs are `SplitScores`. Training validates
with `retrieval_protocol(folds)`: the same retrieval metrics on any split size.
"""
import dataclasses
import functools
from typing import Callable, NamedTuple

import numpy as np
from absl import logging

from dual_path import evaluation

AUTO = "auto"
COCO_1K_IMAGES = 5000
COCO_1K_FOLDS = 5


class SplitScores(NamedTuple):
    """What every protocol reads (N images, M captions of one split).

    similarity: float32 [N, M], image embedding . caption embedding (cosine).
    image_of_text: int [M], the image index of each caption.
    image_labels: int [N], each image's label (the person id for CUHK-PEDES).
    text_labels: int [M], the label of each caption's image.
    """

    similarity: np.ndarray
    image_of_text: np.ndarray
    image_labels: np.ndarray
    text_labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Protocol:
    """name: its --protocol value. expected_images: the split size it is published on
    (None: any). metrics: SplitScores -> {metric name: float} (R@K, top-K and mAP in
    percent, ranks from 1; experiments/tables.py prints them)."""

    name: str
    description: str
    expected_images: int | None
    metrics: Callable[[SplitScores], dict]


def _retrieval(folds: int, scores: SplitScores) -> dict:
    return evaluation.retrieval_metrics(scores.similarity, scores.image_of_text, folds=folds)


def _person_search(scores: SplitScores) -> dict:
    if len(np.unique(scores.image_labels)) == len(scores.image_labels):
        logging.warning("every image of the split has its own label, so person search counts "
                        "only each caption's own image: are these shards without person ids "
                        "(image indices as labels)?")
    return evaluation.person_search_metrics(scores.similarity, scores.image_labels,
                                            scores.text_labels)


PROTOCOLS = {protocol.name: protocol for protocol in (
    Protocol("flickr_1k", "all images against all their captions (Flickr: 1,000 test images)",
             1000, functools.partial(_retrieval, 1)),
    Protocol("coco_1k", "5 folds of 1,000 images against their own captions, averaged",
             COCO_1K_IMAGES, functools.partial(_retrieval, COCO_1K_FOLDS)),
    Protocol("coco_5k", "all 5,000 MSCOCO test images against all their captions",
             COCO_1K_IMAGES, functools.partial(_retrieval, 1)),
    Protocol("cuhk_pedes", "text -> image person search, top-K and mAP by person id",
             None, _person_search),
)}


def retrieval_protocol(folds: int) -> Protocol:
    """Retrieval on a split of any size in `folds` consecutive folds of its images, each
    against its own captions, the metrics averaged: what training validates with
    (--eval_folds); flickr_1k's computation for 1 fold, coco_1k's for 5."""
    if folds < 1:
        raise ValueError(f"folds must be positive, got {folds}")
    return Protocol(f"retrieval_{folds}_folds",
                    f"the split's images in {folds} folds against their own captions, averaged",
                    None, functools.partial(_retrieval, folds))


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def auto_protocol(dataset_name: str, num_images: int) -> str:
    """cuhk_pedes for a CUHK-PEDES dataset; coco_1k for a 5,000-image MSCOCO split (the
    paper's COCO table; coco_5k is chosen by name only); else flickr_1k."""
    name = dataset_name.lower()
    if "cuhk" in name:
        return "cuhk_pedes"
    if "coco" in name and num_images == COCO_1K_IMAGES:
        return "coco_1k"
    return "flickr_1k"


def image_labels(image_of_text: np.ndarray, text_labels: np.ndarray, num_images: int,
                 where: str) -> np.ndarray:
    """int [num_images] labels of the images, from their captions' labels (every caption of
    an image carries the image's label). Raises ValueError naming `where` when an image has
    no caption or its captions disagree."""
    labels = np.full(num_images, -1, dtype=np.int64)
    labels[image_of_text] = text_labels
    if np.any(labels[image_of_text] != text_labels):
        caption = int(np.argmax(labels[image_of_text] != text_labels))
        raise ValueError(f"{where}: caption {caption} has label {text_labels[caption]} but another "
                         f"caption of image {image_of_text[caption]} has "
                         f"{labels[image_of_text[caption]]}")
    if len(image_of_text) == 0 or np.bincount(image_of_text, minlength=num_images).min() == 0:
        raise ValueError(f"{where}: an image has no caption, so it has no label")
    return labels
