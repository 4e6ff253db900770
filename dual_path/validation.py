"""Validation during training: a split embedded by the current model and scored with the
retrieval protocol of the run's fold count (`dual_path.protocols`), the validation curve of the
run, and the embeddings of the last validation (which the projector and the final results
reuse when the weights have not changed since).
"""
from typing import Mapping, NamedTuple

import numpy as np

from dual_path import embeddings, protocols


class Validation(NamedTuple):
    """One validation: stage, step (within the stage), the split's metrics ({R@K, medr, rsum,
    ...}), its embeddings and similarity float32 [N images, M captions]."""

    stage: int
    step: int
    metrics: dict
    split_embeddings: embeddings.SplitEmbeddings
    similarity: np.ndarray


class Validator:
    """Scores splits of shard_dir with `embedder` (an embeddings.SplitEmbedder) under
    `protocols.retrieval_protocol(folds)`, and keeps the run's validation curve."""

    def __init__(self, embedder: embeddings.SplitEmbedder, shard_dir: str, folds: int,
                 steps_per_epoch: Mapping[int, int]):
        """steps_per_epoch: stage number -> its steps per epoch (the curve's epochs)."""
        self.embedder = embedder
        self.shard_dir = shard_dir
        self.protocol = protocols.retrieval_protocol(folds)
        self.steps_per_epoch = steps_per_epoch
        self.last: Validation | None = None
        self.curve: list[dict] = []
        """{"stage", "step", "epoch", "rsum"} of every validation this process ran."""

    def scores(self, split_embeddings: embeddings.SplitEmbeddings) -> tuple[dict, np.ndarray]:
        """(the protocol's metrics, similarity [N, M]) of a split's embeddings."""
        similarity = split_embeddings.image @ split_embeddings.text.T
        image_of_text = split_embeddings.image_of_text
        metrics = self.protocol.metrics(protocols.SplitScores(
            similarity, image_of_text, np.arange(len(split_embeddings.image)), image_of_text))
        return metrics, similarity

    def evaluate(self, split: str) -> tuple[dict, embeddings.SplitEmbeddings, np.ndarray]:
        """(metrics, embeddings, similarity [N, M]) of a split with the current weights."""
        split_embeddings = self.embedder(self.shard_dir, split)
        metrics, similarity = self.scores(split_embeddings)
        return metrics, split_embeddings, similarity

    def validate(self, split: str, stage: int, step: int) -> Validation:
        """Evaluates the split, remembers it as the last validation and adds it to the curve."""
        metrics, split_embeddings, similarity = self.evaluate(split)
        self.last = Validation(stage, step, metrics, split_embeddings, similarity)
        self.curve.append({"stage": stage, "step": step, "epoch": step / self.steps_per_epoch[stage],
                           "rsum": metrics["rsum"]})
        return self.last

    def last_at(self, stage: int, step: int) -> Validation | None:
        """The last validation if it ran at this stage and step (the weights it scored are the
        current ones), else None."""
        if self.last is not None and (self.last.stage, self.last.step) == (stage, step):
            return self.last
        return None
