"""Whether the instance loss is learning: the trainer's checks at every validation interval and epoch.

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
watches every epoch: a path collapses when its mean train accuracy over the epoch falls below
COLLAPSE_FRACTION of its peak, the best epoch so far in the stage or, in stage II, stage I's
last epoch (its done marker's "train_accuracy"). Epochs, not log intervals: within an epoch
the text accuracy swings by 4x and more, which log intervals would take for collapses. It is
highest in the first steps after an epoch boundary and lowest at its end: with a new order
every epoch, the image at step p of an epoch was last trained on, on average, half an epoch
plus p steps before, and the text path forgets. Only an epoch with at least
COLLAPSE_MIN_HITS correct examples can set the peak, and the fall counts only where the peak
accuracy would give that many in the falling epoch too, so that a halving is over three
standard deviations of a binomial count, not a small epoch's noise. A path is named once per
stage (a resumed stage starts a new watch).
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

    `update` takes each epoch's mean accuracies and returns {path: why} for the paths that
    collapsed in that epoch; a path is named at most once per watch (one per stage), so a long
    collapse gives one warning, not one per epoch.
    """

    def __init__(self, previous_stage: Mapping[str, float] | None = None,
                 previous_stage_name: str = "stage 1's last epoch"):
        """previous_stage: path -> its train accuracy over the previous stage's last epoch,
        the peak to start from (named `previous_stage_name` in the warning)."""
        self._peaks = {path: (accuracy, previous_stage_name)
                       for path, accuracy in (previous_stage or {}).items()}
        self._named: set[str] = set()

    def update(self, epoch: int, accuracies: Mapping[str, float], examples: int) -> dict[str, str]:
        """{path: why it collapsed} in the stage's epoch `epoch`.

        Args:
          epoch: the stage's epoch (1-based) that just ended.
          accuracies: path -> its train instance accuracy averaged over the epoch (0..1).
          examples: how many training examples the epoch's steps saw (fewer than an epoch's
            in the first epoch of a resumed stage).
        """
        collapsed = {}
        for path, accuracy in accuracies.items():
            peak, peak_name = self._peaks.get(path, (0.0, ""))
            if (path not in self._named and peak * examples >= COLLAPSE_MIN_HITS
                    and accuracy < COLLAPSE_FRACTION * peak):
                collapsed[path] = (f"train accuracy {accuracy:.3f} over the epoch fell below "
                                   f"{COLLAPSE_FRACTION:g} x its peak, {peak:.3f} in {peak_name}")
                self._named.add(path)
            if accuracy > peak and accuracy * examples >= COLLAPSE_MIN_HITS:
                self._peaks[path] = (accuracy, f"epoch {epoch}")
        return collapsed
