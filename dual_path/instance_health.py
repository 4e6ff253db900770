"""Whether the instance loss is learning: the trainer's check at every validation interval.

With one class per training image, C is in the thousands, and a softmax over C classes that
has not learnt anything sits at loss ln C with accuracy 1/C. On this project's budgets the
paper's plain softmax has stayed there for whole stages, while the ranking loss alone made
retrieval look fine. The trainer averages each path's instance loss and train accuracy over
a validation interval and calls `inert_paths`; a path that is inert gets a warning with the
figures, so that a user sees when the paper's loss is doing nothing.

A path is inert when, over the interval,
  mean loss >= (1 - LOSS_TOLERANCE) * ln C          (within a few percent of chance, or worse), or
  mean accuracy < CHANCE_FACTOR / C                 (at chance: fewer hits than a few lucky guesses).
The train accuracy is measured in training mode (dropout on), as the step computes it.

A path can also learn and then lose what it learnt: stage II's first steps (the backbone and
the ranking loss joining at the base rate) have taken the main Flickr8k recipe's image accuracy
from 1.00 at stage I's end to 0.18 over its first 50 steps and 0.000 by step 93, recovering
only epochs later, with nothing at a validation interval's end to show it. `AccuracyCollapse`
watches every log interval: a path collapses when its mean train accuracy over the interval
falls below COLLAPSE_FRACTION of its peak so far in the stage. Only intervals where the
accuracy stands for at least COLLAPSE_MIN_HITS correct examples can be the peak, and the fall
counts only where the peak accuracy would give that many hits in the falling interval too: a
halving is then over three standard deviations of a binomial count, not a small interval's
noise. A path is named once per stage.
"""
import math
from typing import Mapping

LOSS_TOLERANCE = 0.03
CHANCE_FACTOR = 5.0
COLLAPSE_FRACTION = 0.5
COLLAPSE_MIN_HITS = 50


def inert_paths(mean_losses: Mapping[str, float], mean_accuracies: Mapping[str, float],
                num_classes: int) -> dict[str, str]:
    """{path: why it is inert} for the paths ("image", "text") whose instance loss is not learning.

    Args:
      mean_losses: path -> its instance loss averaged over the interval (nats).
      mean_accuracies: path -> its train instance accuracy averaged over the interval (0..1).
      num_classes: C.
    """
    if num_classes < 2:
        return {}
    chance_loss = math.log(num_classes)
    loss_floor = (1.0 - LOSS_TOLERANCE) * chance_loss
    accuracy_floor = CHANCE_FACTOR / num_classes
    inert = {}
    for path, loss in mean_losses.items():
        accuracy = mean_accuracies[path]
        reasons = []
        if loss >= loss_floor:
            where = (f"within {LOSS_TOLERANCE:.0%} of" if loss <= chance_loss else "above")
            reasons.append(f"loss {loss:.3f} is {where} ln C = {chance_loss:.3f}")
        if accuracy < accuracy_floor:
            reasons.append(f"train accuracy {accuracy:.5f} is below {CHANCE_FACTOR:g} x chance "
                           f"(1/C = {1.0 / num_classes:.5f})")
        if reasons:
            inert[path] = "; ".join(reasons)
    return inert


class AccuracyCollapse:
    """One stage's watch for trained paths whose train accuracy falls far below its peak.

    `update` takes each log interval's mean accuracies and returns {path: why} for the paths
    that collapsed at that interval; a path is named at most once per watch (one per stage),
    so a long collapse gives one warning, not one per log interval.
    """

    def __init__(self):
        self._peaks: dict[str, tuple[float, int]] = {}
        self._named: set[str] = set()

    def update(self, step: int, accuracies: Mapping[str, float], examples: int) -> dict[str, str]:
        """{path: why it collapsed} at the log interval ending at `step`.

        Args:
          step: the stage's step at the end of the interval.
          accuracies: path -> its train instance accuracy averaged over the interval (0..1).
          examples: how many training examples the interval's steps saw.
        """
        collapsed = {}
        for path, accuracy in accuracies.items():
            peak, peak_step = self._peaks.get(path, (0.0, step))
            if (path not in self._named and peak * examples >= COLLAPSE_MIN_HITS
                    and accuracy < COLLAPSE_FRACTION * peak):
                collapsed[path] = (f"train accuracy {accuracy:.3f} fell below "
                                   f"{COLLAPSE_FRACTION:g} x its peak this stage, {peak:.3f} at "
                                   f"step {peak_step}")
                self._named.add(path)
            if accuracy > peak and accuracy * examples >= COLLAPSE_MIN_HITS:
                self._peaks[path] = (accuracy, step)
        return collapsed
