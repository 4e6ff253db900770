"""Retrieval metrics: VSE++-style recall@K for Flickr/COCO, and person search for CUHK-PEDES.

Ranks are computed without sorting: the rank of a correct item is the number of
items that score STRICTLY higher than it. Ties are therefore resolved in favour of
the correct item (an item tied with the correct one never pushes it down); a
per-query argsort reference agrees exactly when it places correct items before
incorrect ones of equal score. The similarity matrix is processed in chunks of
rows so that the temporary boolean arrays stay around `_CHUNK_ELEMENTS` elements.
"""
import numpy as np
from numpy.typing import ArrayLike

RECALL_KS = (1, 5, 10)
RECALL_KEYS = tuple(f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in RECALL_KS)
"""retrieval_metrics' six R@K keys, image->text then text->image; "rsum" is their sum."""

# Elements of a temporary [rows, columns] comparison per chunk (bools: 32 MiB).
_CHUNK_ELEMENTS = 1 << 25


def _as_numpy(name: str, value: ArrayLike, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def _as_similarity(value: ArrayLike) -> np.ndarray:
    similarity = _as_numpy("similarity", value, 2)
    if not np.issubdtype(similarity.dtype, np.floating):
        raise ValueError(f"similarity must be a float array, got {similarity.dtype}")
    return similarity


def _chunks(num_rows: int, num_columns: int):
    """Yields slices of rows so that each chunk has about `_CHUNK_ELEMENTS` elements."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, num_columns))
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def _recall_summary(prefix: str, ranks: np.ndarray) -> dict:
    """VSE++ summary of 0-based ranks: R@K in percent, medr and meanr (1-based)."""
    metrics = {f"{prefix}_r{k}": 100.0 * np.count_nonzero(ranks < k) / len(ranks)
               for k in RECALL_KS}
    metrics[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    metrics[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return metrics


def _ranks(similarity: np.ndarray, image_of_text: np.ndarray):
    """0-based ranks of the correct items, for both directions.

    Returns:
      (i2t_ranks int64 [num_images]: per image, the rank of its best-placed caption
       among all texts; t2i_ranks int64 [num_texts]: per text, the rank of its image
       among all images).
    """
    num_images, num_texts = similarity.shape
    positive = similarity[image_of_text, np.arange(num_texts)]  # [num_texts]
    best_positive = np.full(num_images, -np.inf, dtype=similarity.dtype)
    np.maximum.at(best_positive, image_of_text, positive)
    i2t_ranks = np.empty(num_images, dtype=np.int64)
    t2i_ranks = np.zeros(num_texts, dtype=np.int64)
    for rows in _chunks(num_images, num_texts):
        block = similarity[rows]
        i2t_ranks[rows] = np.count_nonzero(block > best_positive[rows, np.newaxis], axis=1)
        t2i_ranks += np.count_nonzero(block > positive[np.newaxis, :], axis=0)
    return i2t_ranks, t2i_ranks


def _fold_metrics(similarity: np.ndarray, image_of_text: np.ndarray) -> dict:
    i2t_ranks, t2i_ranks = _ranks(similarity, image_of_text)
    return {**_recall_summary("i2t", i2t_ranks), **_recall_summary("t2i", t2i_ranks)}


def retrieval_metrics(similarity: ArrayLike, image_of_text: ArrayLike, folds: int = 1) -> dict:
    """Image->text and text->image retrieval metrics with the VSE++ definitions.

    i2t: each image queries all texts; it is found at the best rank among its
    captions. t2i: each text queries all images. Ranks count from 1 (see the module
    docstring for ties); medr = floor(median of 0-based ranks) + 1, meanr = mean of
    0-based ranks + 1. Any number of captions per image, in any order.

    Args:
      similarity: float [num_images, num_texts] (NumPy or tensor), higher = closer.
      image_of_text: int [num_texts], the index of each text's image.
      folds: k splits the images into k consecutive parts (numpy.array_split), each
        evaluated against its own captions only; the metrics are the means over folds
        (COCO 1K: folds=5 on the 5K test images).
    Returns:
      dict of Python floats: i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 (percent),
      i2t_medr, i2t_meanr, t2i_medr, t2i_meanr (ranks), and rsum (the sum of the six
      averaged recalls).
    """
    similarity = _as_similarity(similarity)
    image_of_text = _as_numpy("image_of_text", image_of_text, 1).astype(np.int64)
    num_images, num_texts = similarity.shape
    if len(image_of_text) != num_texts:
        raise ValueError(f"image_of_text has {len(image_of_text)} entries but similarity has "
                         f"{num_texts} text columns")
    if num_texts and (image_of_text.min() < 0 or image_of_text.max() >= num_images):
        raise ValueError(f"image_of_text must lie in [0, {num_images})")
    captions_per_image = np.bincount(image_of_text, minlength=num_images)
    if np.any(captions_per_image == 0):
        raise ValueError(f"image {int(np.argmin(captions_per_image))} has no caption")
    if not 1 <= folds <= num_images:
        raise ValueError(f"folds must be in [1, {num_images}], got {folds}")

    per_fold = []
    for fold_images in np.array_split(np.arange(num_images), folds):
        fold_texts = np.flatnonzero(np.isin(image_of_text, fold_images))
        fold_similarity = similarity[fold_images[0]:fold_images[-1] + 1]
        if len(fold_texts) < num_texts:
            fold_similarity = fold_similarity[:, fold_texts]
        per_fold.append(_fold_metrics(fold_similarity, image_of_text[fold_texts] - fold_images[0]))
    metrics = {name: float(np.mean([fold[name] for fold in per_fold])) for name in per_fold[0]}
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"]
                          for direction in ("i2t", "t2i") for k in RECALL_KS)
    return metrics


def person_search_metrics(similarity: ArrayLike,
                          image_person_ids: ArrayLike,
                          text_person_ids: ArrayLike) -> dict:
    """Text-to-image person search (CUHK-PEDES protocol): top-K and mAP.

    Each text queries all images; every image of the text's person id is a match.
    Ranked list: images by decreasing similarity, matches before non-matches of
    equal score (the module's tie rule). A query's average precision is the mean,
    over its matches in ranked order (k = 1..K), of k / (1-based position of the
    k-th match); position of the k-th match = k + number of non-matches scoring
    strictly higher than it.

    Args:
      similarity: float [num_images, num_texts] (NumPy or tensor), higher = closer.
      image_person_ids: int [num_images].
      text_person_ids: int [num_texts]; each must have at least one image.
    Returns:
      dict of Python floats in percent: t2i_top1, t2i_top5, t2i_top10 (share of
      queries with a match in the first K images) and t2i_map (mean AP over queries).
    """
    similarity = _as_similarity(similarity)
    image_person_ids = _as_numpy("image_person_ids", image_person_ids, 1)
    text_person_ids = _as_numpy("text_person_ids", text_person_ids, 1)
    num_images, num_texts = similarity.shape
    if len(image_person_ids) != num_images or len(text_person_ids) != num_texts:
        raise ValueError(f"similarity is {similarity.shape} but there are "
                         f"{len(image_person_ids)} image and {len(text_person_ids)} text ids")
    if num_texts == 0:
        raise ValueError("similarity has no text columns (no queries)")
    unmatched = ~np.isin(text_person_ids, image_person_ids)
    if np.any(unmatched):
        raise ValueError(f"text {int(np.argmax(unmatched))} (person id "
                         f"{text_person_ids[unmatched][0]}) has no image of its person")

    # Images grouped by person: images_of_group[g] lists group g's image indices, -1-padded.
    person_ids, image_group = np.unique(image_person_ids, return_inverse=True)
    images_per_group = np.bincount(image_group)
    by_group = np.argsort(image_group, kind="stable")
    group_starts = np.cumsum(images_per_group) - images_per_group
    images_of_group = np.full((len(person_ids), images_per_group.max()), -1, dtype=np.int64)
    images_of_group[image_group[by_group],
                    np.arange(num_images) - np.repeat(group_starts, images_per_group)] = by_group
    text_group = np.searchsorted(person_ids, text_person_ids)

    first_position = np.empty(num_texts, dtype=np.int64)
    average_precision = np.empty(num_texts, dtype=np.float64)
    for columns in _chunks(num_texts, num_images):
        query_group = text_group[columns]  # [c]
        scores = similarity[:, columns].T  # [c, num_images]
        non_match_scores = np.where(query_group[:, np.newaxis] == image_group[np.newaxis, :],
                                    -np.inf, scores)
        match_images = images_of_group[query_group]  # [c, max_matches]
        match_scores = np.where(match_images >= 0,
                                np.take_along_axis(scores, np.maximum(match_images, 0), axis=1),
                                -np.inf)
        match_scores = -np.sort(-match_scores, axis=1)  # decreasing, padding last
        matches_per_query = images_per_group[query_group]  # [c]
        precision_sum = np.zeros(len(query_group), dtype=np.float64)
        for k in range(1, match_scores.shape[1] + 1):
            threshold = match_scores[:, k - 1, np.newaxis]
            position = k + np.count_nonzero(non_match_scores > threshold, axis=1)
            if k == 1:
                first_position[columns] = position
            precision_sum += np.where(k <= matches_per_query, k / position, 0.0)
        average_precision[columns] = precision_sum / matches_per_query
    metrics = {f"t2i_top{k}": float(100.0 * np.count_nonzero(first_position <= k) / num_texts)
               for k in RECALL_KS}
    metrics["t2i_map"] = float(100.0 * average_precision.mean())
    return metrics
