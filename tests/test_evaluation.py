"""dual_path.evaluation: hand-made cases and per-query argsort references."""
import numpy as np
import pytest
import tensorflow as tf

from dual_path import evaluation

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def ranked_order(scores, is_correct):
    """Indices by decreasing score, correct items first among equal scores (stable)."""
    return np.lexsort((~is_correct, -scores))


def summary(prefix, ranks):
    metrics = {f"{prefix}_r{k}": 100.0 * np.mean(ranks < k) for k in (1, 5, 10)}
    metrics[f"{prefix}_medr"] = np.floor(np.median(ranks)) + 1
    metrics[f"{prefix}_meanr"] = ranks.mean() + 1
    return metrics


def reference_retrieval_metrics(similarity, image_of_text):
    """VSE++ i2t/t2i with one argsort per query."""
    num_images, num_texts = similarity.shape
    i2t_ranks = np.array([
        np.flatnonzero((image_of_text == i)[ranked_order(similarity[i], image_of_text == i)])[0]
        for i in range(num_images)])
    t2i_ranks = np.array([
        np.flatnonzero(ranked_order(similarity[:, j], np.arange(num_images) == image_of_text[j])
                       == image_of_text[j])[0]
        for j in range(num_texts)])
    metrics = {**summary("i2t", i2t_ranks), **summary("t2i", t2i_ranks)}
    metrics["rsum"] = sum(metrics[name] for name in RECALLS)
    return metrics


def reference_person_search(similarity, image_ids, text_ids):
    top = {1: [], 5: [], 10: []}
    average_precisions = []
    for j in range(similarity.shape[1]):
        is_match = image_ids == text_ids[j]
        hits = is_match[ranked_order(similarity[:, j], is_match)]
        positions = np.flatnonzero(hits) + 1
        for k in top:
            top[k].append(positions[0] <= k)
        average_precisions.append(np.mean(np.arange(1, len(positions) + 1) / positions))
    metrics = {f"t2i_top{k}": 100.0 * np.mean(top[k]) for k in top}
    metrics["t2i_map"] = 100.0 * np.mean(average_precisions)
    return metrics


def assert_metrics_equal(actual, expected):
    assert set(actual) == set(expected)
    for name in expected:
        assert type(actual[name]) is float, name
        assert actual[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name


def test_perfect_similarity():
    image_of_text = np.array([0, 0, 1, 1, 2, 2])
    similarity = (image_of_text[np.newaxis, :] == np.arange(3)[:, np.newaxis]).astype(np.float32)
    metrics = evaluation.retrieval_metrics(similarity, image_of_text)
    for name in RECALLS:
        assert metrics[name] == 100.0
    assert metrics["i2t_medr"] == metrics["t2i_medr"] == 1.0
    assert metrics["i2t_meanr"] == metrics["t2i_meanr"] == 1.0
    assert metrics["rsum"] == 600.0


def test_reversed_similarity():
    # One caption per image; each correct pair scores lowest: 0-based rank 2 of 3.
    similarity = -np.eye(3, dtype=np.float32)
    metrics = evaluation.retrieval_metrics(similarity, np.arange(3))
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 0.0
    assert metrics["i2t_r5"] == metrics["t2i_r10"] == 100.0
    assert metrics["i2t_medr"] == metrics["t2i_meanr"] == 3.0
    assert metrics["rsum"] == 400.0


def test_ties_count_in_favour_of_the_correct_item():
    similarity = np.zeros((4, 8), np.float32)
    metrics = evaluation.retrieval_metrics(similarity, np.repeat(np.arange(4), 2))
    assert metrics["rsum"] == 600.0
    assert metrics["t2i_meanr"] == 1.0
    # One wrong text ties with image 0's best caption, one scores strictly higher.
    similarity[0] = [0.5, 0.2, 0.5, 0.9, 0.0, 0.0, 0.0, 0.0]
    metrics = evaluation.retrieval_metrics(similarity, np.repeat(np.arange(4), 2))
    assert metrics["i2t_r1"] == 75.0
    assert metrics["i2t_meanr"] == pytest.approx((2 + 1 + 1 + 1) / 4)


def test_uneven_captions_per_image():
    # Image 0 has 3 captions, image 1 one, image 2 two; texts are not grouped by image.
    image_of_text = np.array([2, 0, 1, 0, 2, 0])
    similarity = np.array([
        [0.1, 0.3, 0.9, 0.8, 0.2, 0.0],   # image 0: captions 1, 3, 5; best (0.8) ranks 1
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.6],   # image 1: caption 2 (0.3) ranks 3
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],   # image 2: captions 0, 4; best (0.9) ranks 0
    ], np.float32)
    metrics = evaluation.retrieval_metrics(similarity, image_of_text)
    # i2t ranks [1, 3, 0]; t2i ranks [0, 1, 1, 0, 0, 2].
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r5"] == 100.0
    assert metrics["i2t_medr"] == 2.0
    assert metrics["i2t_meanr"] == pytest.approx(1 + 4 / 3)
    assert metrics["t2i_r1"] == 50.0
    assert metrics["t2i_medr"] == 1.0
    assert metrics["t2i_meanr"] == pytest.approx(1 + 4 / 6)
    assert_metrics_equal(metrics, reference_retrieval_metrics(similarity, image_of_text))


def test_folds_rank_within_each_fold_and_average():
    # 4 images, 1 caption each; in the full matrix image 1's caption is outranked only by
    # text 3, which belongs to the other fold.
    similarity = np.array([
        [0.9, 0.0, 0.0, 0.0],
        [0.0, 0.5, 0.0, 0.8],
        [0.0, 0.0, 0.2, 0.1],
        [0.0, 0.0, 0.7, 0.3],
    ], np.float32)
    image_of_text = np.arange(4)
    full = evaluation.retrieval_metrics(similarity, image_of_text)
    assert full["i2t_r1"] == 50.0   # images 1 and 3 are outranked
    folded = evaluation.retrieval_metrics(similarity, image_of_text, folds=2)
    # Fold {0, 1}: all perfect. Fold {2, 3}: image 3 prefers text 2; text 2 prefers image 3.
    assert folded["i2t_r1"] == pytest.approx((100 + 50) / 2)
    assert folded["t2i_r1"] == pytest.approx((100 + 50) / 2)
    assert folded["i2t_meanr"] == pytest.approx((1.0 + 1.5) / 2)
    assert folded["rsum"] == pytest.approx(75 + 100 + 100 + 75 + 100 + 100)
    per_fold = [reference_retrieval_metrics(similarity[rows][:, rows], np.arange(2))
                for rows in (slice(0, 2), slice(2, 4))]
    assert_metrics_equal(folded, {
        **{name: np.mean([fold[name] for fold in per_fold]) for name in per_fold[0]},
        "rsum": folded["rsum"]})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_matrices_match_argsort_reference(seed, monkeypatch):
    # Small chunks so that several row chunks are processed.
    monkeypatch.setattr(evaluation, "_CHUNK_ELEMENTS", 200)
    rng = np.random.default_rng(seed)
    num_images = 37
    image_of_text = rng.permutation(np.concatenate(
        [np.arange(num_images), rng.integers(0, num_images, size=60)]))
    # Scores on a coarse grid so that ties occur often.
    similarity = rng.integers(0, 6, size=(num_images, len(image_of_text))).astype(np.float32)
    similarity[image_of_text, np.arange(len(image_of_text))] += rng.integers(0, 3, len(image_of_text))
    assert_metrics_equal(evaluation.retrieval_metrics(similarity, image_of_text),
                         reference_retrieval_metrics(similarity, image_of_text))


def test_five_captions_per_image_tensor_input_and_folds():
    rng = np.random.default_rng(4)
    image_of_text = np.repeat(np.arange(50), 5)
    similarity = rng.standard_normal((50, 250)).astype(np.float32)
    similarity[image_of_text, np.arange(250)] += 1.5
    expected = reference_retrieval_metrics(similarity, image_of_text)
    assert_metrics_equal(evaluation.retrieval_metrics(tf.constant(similarity),
                                                      tf.constant(image_of_text)), expected)
    folded = evaluation.retrieval_metrics(similarity, image_of_text, folds=5)
    per_fold = [reference_retrieval_metrics(similarity[10 * f:10 * f + 10, 50 * f:50 * f + 50],
                                            np.repeat(np.arange(10), 5)) for f in range(5)]
    for name in per_fold[0]:
        if name != "rsum":
            assert folded[name] == pytest.approx(np.mean([fold[name] for fold in per_fold])), name
    assert folded["rsum"] == pytest.approx(sum(folded[name] for name in RECALLS))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        evaluation.retrieval_metrics(np.zeros((3, 2), np.float32), np.array([0, 2]))
    with pytest.raises(ValueError, match="3 entries"):
        evaluation.retrieval_metrics(np.zeros((2, 2), np.float32), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="must lie in"):
        evaluation.retrieval_metrics(np.zeros((2, 2), np.float32), np.array([0, 2]))
    with pytest.raises(ValueError, match="float"):
        evaluation.retrieval_metrics(np.zeros((2, 2), np.int32), np.array([0, 1]))
    with pytest.raises(ValueError, match="folds"):
        evaluation.retrieval_metrics(np.zeros((2, 2), np.float32), np.array([0, 1]), folds=3)
    with pytest.raises(ValueError, match="no queries"):
        evaluation.person_search_metrics(np.zeros((2, 0), np.float32), np.array([3, 4]),
                                         np.array([], np.int64))
    with pytest.raises(ValueError, match="person id 8"):
        evaluation.person_search_metrics(np.zeros((2, 2), np.float32), np.array([3, 4]),
                                         np.array([3, 8]))


def test_person_search_hand_case():
    # Images of persons [7, 7, 8, 9]; two text queries.
    image_ids = np.array([7, 7, 8, 9])
    text_ids = np.array([7, 9])
    similarity = np.array([
        [0.9, 0.1],
        [0.2, 0.3],   # second image of person 7, ranked 3rd for text 0
        [0.5, 0.8],
        [0.1, 0.8],   # text 1's only match, tied with image 2: ranked first
    ], np.float32)
    metrics = evaluation.person_search_metrics(similarity, image_ids, text_ids)
    assert metrics["t2i_top1"] == 100.0
    # Text 0: matches at positions 1 and 3 -> AP (1/1 + 2/3) / 2; text 1: AP 1.
    assert metrics["t2i_map"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)
    similarity[3, 1] = 0.0   # now 3 non-matches of text 1 score higher: position 4
    metrics = evaluation.person_search_metrics(similarity, image_ids, text_ids)
    assert metrics["t2i_top1"] == 50.0
    assert metrics["t2i_top5"] == 100.0
    assert metrics["t2i_map"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 4) / 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_person_search_matches_argsort_reference(seed, monkeypatch):
    monkeypatch.setattr(evaluation, "_CHUNK_ELEMENTS", 300)
    rng = np.random.default_rng(seed)
    image_ids = rng.integers(100, 112, size=40)
    text_ids = rng.choice(np.unique(image_ids), size=70)
    similarity = rng.integers(0, 8, size=(40, 70)).astype(np.float32)
    assert_metrics_equal(evaluation.person_search_metrics(similarity, image_ids, text_ids),
                         reference_person_search(similarity, image_ids, text_ids))
