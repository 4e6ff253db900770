"""dual_path.protocols: the computation of each protocol on hand-made similarities (fold
averaging, person search's label check), picking a protocol by name or from the dataset, and
image labels read off the captions'. The expected numbers are worked out in the comments."""
import logging

import numpy as np
import pytest

from dual_path import protocols

NUM_IMAGES, CAPTIONS_PER_IMAGE = 7, 5


def five_captions_each() -> protocols.SplitScores:
    """7 images with 5 captions each (caption c describes image c // 5), each image scoring 1
    with its own captions and 0 with the rest, except two confusions:
      caption 0 (image 0) scores 2 with image 1: both in coco_1k's fold 0;
      caption 0 scores 3 with image 6: image 6 is in coco_1k's last fold, so only one-fold
      protocols see it.
    np.array_split gives coco_1k's 5 folds of 7 images as [0, 1], [2, 3], [4], [5], [6]."""
    image_of_text = np.arange(NUM_IMAGES * CAPTIONS_PER_IMAGE) // CAPTIONS_PER_IMAGE
    similarity = (np.arange(NUM_IMAGES)[:, None] == image_of_text[None, :]).astype(np.float32)
    similarity[1, 0] = 2.0
    similarity[6, 0] = 3.0
    labels = np.arange(NUM_IMAGES)
    return protocols.SplitScores(similarity, image_of_text, labels, labels[image_of_text])


def test_coco_1k_averages_its_five_folds_unweighted_each_against_its_own_captions():
    """Fold 0 (images 0, 1; captions 0-9): caption 0 finds image 1 (2) before its own (1),
    0-based rank 1: t2i R@1 9/10 = 90%, meanr (1 + 9 * 0) / 10 + 1 = 1.1. Image 1 finds
    caption 0 (2) before its own captions (1), rank 1; image 0 ranks first: i2t R@1 50%, meanr
    1.5. Image 6's confusion lies across folds, unseen. Folds 1-4 are perfect (R@1 100, meanr 1).
    Means over the 5 folds: t2i R@1 (90 + 4 * 100) / 5 = 98, i2t R@1 (50 + 400) / 5 = 90,
    t2i meanr (1.1 + 4) / 5 = 1.02, i2t meanr (1.5 + 4) / 5 = 1.1; R@5 and R@10 are 100
    everywhere. Weighting folds by their captions or images would give 34/35 and 6/7 instead."""
    metrics = protocols.get_protocol("coco_1k").metrics(five_captions_each())
    assert metrics["t2i_r1"] == pytest.approx(98.0)
    assert metrics["i2t_r1"] == pytest.approx(90.0)
    assert metrics["t2i_meanr"] == pytest.approx(1.02)
    assert metrics["i2t_meanr"] == pytest.approx(1.1)
    assert metrics["t2i_medr"] == metrics["i2t_medr"] == 1.0
    for direction in ("i2t", "t2i"):
        assert metrics[f"{direction}_r5"] == metrics[f"{direction}_r10"] == 100.0
    assert metrics["rsum"] == pytest.approx(98.0 + 90.0 + 4 * 100.0)


@pytest.mark.parametrize("name", ["coco_5k", "flickr_1k"])
def test_one_fold_protocols_rank_every_image_against_every_caption(name):
    """One fold of all 7 images and 35 captions: caption 0 now has images 6 (3) and 1 (2)
    above its own, rank 2: t2i R@1 34/35, R@5 100%. Images 1 and 6 each find caption 0 first:
    i2t R@1 5/7; t2i meanr (2 + 34 * 0) / 35 + 1, i2t meanr (1 + 1) / 7 + 1."""
    metrics = protocols.get_protocol(name).metrics(five_captions_each())
    assert metrics["t2i_r1"] == pytest.approx(100 * 34 / 35)
    assert metrics["i2t_r1"] == pytest.approx(100 * 5 / 7)
    assert metrics["t2i_r5"] == metrics["i2t_r5"] == 100.0
    assert metrics["t2i_meanr"] == pytest.approx(2 / 35 + 1)
    assert metrics["i2t_meanr"] == pytest.approx(2 / 7 + 1)


def test_person_search_warns_when_every_image_has_a_label_of_its_own(caplog):
    """Shards without person ids label each image by its index: person search then counts
    only a caption's own image, which the protocol says in a warning; shared labels do not."""
    scores = five_captions_each()
    with caplog.at_level(logging.WARNING):
        protocols.get_protocol("cuhk_pedes").metrics(scores)
    assert "every image of the split has its own label" in caplog.text
    caplog.clear()
    persons = np.arange(NUM_IMAGES) // 2
    shared = scores._replace(image_labels=persons, text_labels=persons[scores.image_of_text])
    with caplog.at_level(logging.WARNING):
        protocols.get_protocol("cuhk_pedes").metrics(shared)
    assert "own label" not in caplog.text


def test_get_protocol_names_the_known_ones_when_asked_for_another():
    assert protocols.get_protocol("coco_1k").expected_images == protocols.COCO_1K_IMAGES
    with pytest.raises(ValueError) as error:
        protocols.get_protocol("coco_2k")
    assert str(error.value) == ("unknown protocol 'coco_2k'; known: flickr_1k, coco_1k, coco_5k, "
                                "cuhk_pedes")


@pytest.mark.parametrize("dataset, num_images, expected", [
    ("MSCOCO", 5000, "coco_1k"),  # the name in any case, with a 5,000-image split
    ("mscoco_karpathy", 5000, "coco_1k"),
    ("coco", 4999, "flickr_1k"),  # COCO at another size: all images against all captions
    ("coco_5k", 5000, "coco_1k"),  # coco_5k is never picked, only named
    ("CUHK-PEDES", 5000, "cuhk_pedes"),  # person search whatever the size
    ("flickr30k", 5000, "flickr_1k"),
])
def test_auto_protocol_reads_the_dataset_name_and_the_split_size(dataset, num_images, expected):
    assert protocols.auto_protocol(dataset, num_images) == expected


def test_image_labels_come_from_their_captions_in_any_order():
    labels = protocols.image_labels(np.array([2, 0, 1, 0]), np.array([9, 4, 7, 4]), 3, "here")
    assert labels.tolist() == [4, 7, 9] and labels.dtype == np.int64


def test_image_labels_name_the_caption_that_disagrees():
    """Captions 0 and 1 of image 0 carry labels 7 and 8. The labels are assigned in caption
    order, so image 0 holds 8 (NumPy keeps the last of repeated indices) and caption 0 is the
    first that disagrees with its image."""
    with pytest.raises(ValueError) as error:
        protocols.image_labels(np.array([0, 0, 1]), np.array([7, 8, 9]), 2, "val of shards/x")
    assert str(error.value) == ("val of shards/x: caption 0 has label 7 but another caption of "
                                "image 0 has 8")


@pytest.mark.parametrize("image_of_text, num_images", [
    ([0, 0, 2], 3),  # image 1 has no caption
    ([0, 1], 3),  # the last image has none
    ([], 1),  # no captions at all
])
def test_an_image_without_captions_has_no_label(image_of_text, num_images):
    image_of_text = np.array(image_of_text, dtype=np.int64)
    with pytest.raises(ValueError, match=r"^here: an image has no caption, so it has no label$"):
        protocols.image_labels(image_of_text, np.zeros(len(image_of_text), np.int64), num_images,
                               "here")
