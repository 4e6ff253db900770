"""Validation during training (dual_path/validation.py): scores through the retrieval protocol
of the run's fold count, the curve, and the last validation's reuse."""
import numpy as np
import pytest

from dual_path import embeddings, evaluation, validation


class FixedEmbedder:
    """Stands in for a SplitEmbedder: the same embeddings for every split, calls counted."""

    def __init__(self, split_embeddings):
        self.split_embeddings, self.calls = split_embeddings, []

    def __call__(self, shard_dir, split):
        self.calls.append((shard_dir, split))
        return self.split_embeddings


def split_embeddings(num_images=10, seed=0) -> embeddings.SplitEmbeddings:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(num_images, 4)).astype(np.float32)
    image_of_text = np.repeat(np.arange(num_images), 2).astype(np.int32)
    text = image[image_of_text] + rng.normal(scale=0.8, size=(2 * num_images, 4)).astype(np.float32)
    return embeddings.SplitEmbeddings(image, text, image_of_text)


@pytest.mark.parametrize("folds", [1, 2, 5])
def test_scores_are_the_retrieval_metrics_of_the_runs_folds(folds):
    data = split_embeddings()
    validator = validation.Validator(FixedEmbedder(data), "shards", folds, steps_per_epoch={1: 4})
    metrics, similarity = validator.scores(data)
    np.testing.assert_allclose(similarity, data.image @ data.text.T)
    assert metrics == evaluation.retrieval_metrics(similarity, data.image_of_text, folds=folds)


def test_validations_make_the_curve_and_only_the_last_one_at_a_step_is_reused():
    embedder = FixedEmbedder(split_embeddings())
    # Stage II on batches twice stage I's: half the steps per epoch.
    validator = validation.Validator(embedder, "shards", 1, steps_per_epoch={1: 4, 2: 2})
    first = validator.validate("val", stage=1, step=8)
    second = validator.validate("val", stage=2, step=2)
    assert embedder.calls == [("shards", "val")] * 2
    assert validator.curve == [{"stage": 1, "step": 8, "epoch": 2.0, "rsum": first.metrics["rsum"]},
                               {"stage": 2, "step": 2, "epoch": 1.0, "rsum": second.metrics["rsum"]}]
    assert validator.last_at(2, 2) is second
    assert validator.last_at(1, 8) is None and validator.last_at(2, 3) is None
