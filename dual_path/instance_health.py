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
"""
import math
from typing import Mapping

LOSS_TOLERANCE = 0.03
CHANCE_FACTOR = 5.0


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
