"""The two training losses of the paper: the instance loss and the ranking loss.

Both return float32 scalars and follow one reduction convention, so that a trainer
treats every loss term alike:

    loss returned by a replica = (sum of the per-example losses of ITS rows)
                                 / GLOBAL batch size

where the global batch is the concatenation of all replicas' batches (replicas may
hold different numbers of rows, e.g. on the last batch). Summing the values
returned by the replicas (`strategy.reduce(SUM, per_replica_loss)`) therefore gives
the mean over the global batch, and summing the replicas' gradients (what
`optimizer.apply_gradients` does under a tf.distribute strategy) gives the gradient
of that mean. Outside any strategy, under the default strategy, or when called in a
cross-replica context on a whole batch, the loss is the plain batch mean.

The ranking loss needs the negatives of the whole global batch: inside
`strategy.run` it gathers the embeddings and labels of all replicas (a SUM all-reduce
of each replica's rows placed at their global offset; see `_gather_global_batch`). The
gradient sums the upstream gradients of all replicas and hands each replica the slice
of its own rows, so each replica's embeddings receive the gradient of the global loss
(sum over replicas), and the summed variable gradients equal the 1-replica gradients
on the same global batch (tests/test_losses.py checks this with 2 CPU replicas).
"""
from typing import Optional

import tensorflow as tf


def _replica_context() -> Optional[tf.distribute.ReplicaContext]:
    """The replica context when there is more than one replica in sync, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _global_batch_size(local_batch_size: tf.Tensor) -> tf.Tensor:
    """float32 scalar: the sum over replicas of `local_batch_size` (int32 scalar)."""
    size = tf.cast(local_batch_size, tf.float32)
    context = _replica_context()
    if context is None:
        return size
    return tf.stop_gradient(context.all_reduce(tf.distribute.ReduceOp.SUM, size))


def instance_loss(logits: tf.Tensor, labels: tf.Tensor, label_smoothing: float = 0.0) -> tf.Tensor:
    """Softmax cross-entropy of one path's instance logits against the instance labels.

    With label_smoothing e the target is (1 - e) on the label and e / C on every class
    (Szegedy et al. 2016): per example, (1 - e) * (-log p_label) + e * mean_c(-log p_c).

    Args:
      logits: float [B, C] (any float dtype), the path's features through the shared
        instance classifier W.
      labels: int [B], instance classes in [0, C).
      label_smoothing: e in [0, 1).
    Returns:
      float32 scalar, sum of this replica's per-example losses (nats) / global batch
      size; the batch mean with a single replica.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    logits = tf.cast(logits, tf.float32)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if label_smoothing:
        uniform = -tf.reduce_mean(tf.nn.log_softmax(logits, axis=-1), axis=-1)
        per_example = (1.0 - label_smoothing) * per_example + label_smoothing * uniform
    return tf.reduce_sum(per_example) / _global_batch_size(tf.shape(labels)[0])


def _gather_global_batch(image_emb, text_emb, labels):
    """The global batch's embeddings and labels, and where this replica's rows start.

    Gathered with `ReplicaContext.all_reduce` (SUM of each replica's rows placed at their
    global offset in zeros), not `all_gather`: under MultiWorkerMirroredStrategy all_gather
    goes through a merge_call that needs each tensor's device, which is empty inside a
    tf.function on a worker with one device ("destinations can not be empty"), while
    all_reduce runs in the replica context on every strategy. Its gradient is the SUM
    all-reduce of the upstream gradients, so each replica's rows get the gradient of the
    global loss, as all_gather's would.

    Returns:
      (global_image_emb [G, D], global_text_emb [G, D], global_labels [G] or None,
       row_offset int32 scalar: the global index of this replica's first row).
    """
    context = _replica_context()
    if context is None:
        return image_emb, text_emb, labels, tf.constant(0, tf.int32)
    replicas = context.num_replicas_in_sync
    local_size = tf.shape(image_emb)[0]
    own = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=tf.float32)
    sizes = tf.cast(tf.stop_gradient(context.all_reduce(
        tf.distribute.ReduceOp.SUM, own * tf.cast(local_size, tf.float32))), tf.int32)  # [R]
    row_offset = tf.reduce_sum(tf.where(tf.range(replicas) < context.replica_id_in_sync_group,
                                        sizes, 0))
    after = tf.reduce_sum(sizes) - row_offset - local_size

    def spread(rows):  # [n, ...] -> [G, ...]: this replica's rows at their offset, zeros elsewhere
        return tf.pad(rows, [[row_offset, after]] + [[0, 0]] * (rows.shape.rank - 1))

    global_image_emb, global_text_emb = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [spread(image_emb), spread(text_emb)])
    global_labels = None
    if labels is not None:
        # float32 carries integer labels exactly up to 2**24 classes.
        global_labels = tf.cast(tf.stop_gradient(context.all_reduce(
            tf.distribute.ReduceOp.SUM, spread(tf.cast(labels, tf.float32)))), labels.dtype)
    return global_image_emb, global_text_emb, global_labels, row_offset


def ranking_loss(image_emb: tf.Tensor,
                 text_emb: tf.Tensor,
                 margin: float = 0.2,
                 hardest_negative: bool = True,
                 labels: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Bidirectional hinge ranking loss on cosine similarity.

    Row i of `image_emb` and row i of `text_emb` are a positive pair, with similarity
    s(i, i). Its hinge terms are, over the negatives j,
      image -> text: max(0, margin + s(i, j) - s(i, i)),  j a text of the batch,
      text -> image: max(0, margin + s(j, i) - s(i, i)),  j an image of the batch.
    Negatives are the other rows of the (global) batch, except rows whose label equals
    row i's label when `labels` is given (the same person or image: not a negative).
    Each direction keeps the largest hinge term (`hardest_negative`, VSE++ max
    violation) or sums them; the two directions are added. Per-example loss =
    image->text term + text->image term; the reduction is the module's convention
    (sum over this replica's rows / global batch size, i.e. the batch mean with one
    replica; VSE++ sums over the batch instead, i.e. this value times B). A row
    without any negative contributes 0.

    Args:
      image_emb: float [B, D], L2-normalised image embeddings (any float dtype;
        computed in float32).
      text_emb: float [B, D], L2-normalised text embeddings, matched to images by row.
      margin: the hinge margin (cosine units).
      hardest_negative: True for the hardest negative per direction, False for the
        sum over all negatives.
      labels: optional int [B], instance or person ids; same-label pairs are excluded
        from the negatives.
    Returns:
      float32 scalar.
    """
    image_emb = tf.cast(image_emb, tf.float32)
    text_emb = tf.cast(text_emb, tf.float32)
    global_image_emb, global_text_emb, global_labels, row_offset = _gather_global_batch(
        image_emb, text_emb, labels)

    local_rows = tf.shape(image_emb)[0]
    global_rows = tf.shape(global_image_emb)[0]
    is_self = tf.equal(
        (tf.range(local_rows) + row_offset)[:, tf.newaxis], tf.range(global_rows)[tf.newaxis, :])
    if labels is None:
        is_negative = tf.logical_not(is_self)
    else:
        same_label = tf.equal(tf.convert_to_tensor(labels)[:, tf.newaxis],
                              global_labels[tf.newaxis, :])
        is_negative = tf.logical_not(tf.logical_or(is_self, same_label))

    positive = tf.reduce_sum(image_emb * text_emb, axis=1, keepdims=True)  # [b, 1]
    per_example = tf.zeros_like(positive[:, 0])
    for queries, gallery in ((image_emb, global_text_emb), (text_emb, global_image_emb)):
        similarity = tf.matmul(queries, gallery, transpose_b=True)  # [b, G]
        hinge = tf.where(is_negative, tf.nn.relu(margin + similarity - positive), 0.0)
        if hardest_negative:
            per_example += tf.reduce_max(hinge, axis=1)
        else:
            per_example += tf.reduce_sum(hinge, axis=1)
    return tf.reduce_sum(per_example) / tf.cast(global_rows, tf.float32)
