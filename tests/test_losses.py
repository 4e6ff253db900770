"""dual_path.losses against NumPy references, and the 2-replica reduction convention."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from dual_path import losses


def reference_ranking_loss(image_emb, text_emb, margin, hardest_negative, labels=None):
    """Loop-by-loop bidirectional hinge loss, mean over the batch of (i2t + t2i)."""
    similarity = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
    batch = len(similarity)
    total = 0.0
    for i in range(batch):
        negatives = [j for j in range(batch)
                     if j != i and (labels is None or labels[j] != labels[i])]
        image_to_text = [max(0.0, margin + similarity[i, j] - similarity[i, i]) for j in negatives]
        text_to_image = [max(0.0, margin + similarity[j, i] - similarity[i, i]) for j in negatives]
        if hardest_negative:
            total += max(image_to_text, default=0.0) + max(text_to_image, default=0.0)
        else:
            total += sum(image_to_text) + sum(text_to_image)
    return total / batch


def reference_instance_loss(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), labels].mean()


def random_unit_rows(rng, rows, dims):
    values = rng.standard_normal((rows, dims)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


@pytest.mark.parametrize("hardest_negative", [True, False])
@pytest.mark.parametrize("margin", [0.2, 0.5])
@pytest.mark.parametrize("with_labels", [False, True])
def test_ranking_loss_matches_numpy_reference(hardest_negative, margin, with_labels):
    rng = np.random.default_rng(7)
    image_emb = random_unit_rows(rng, 9, 6)
    text_emb = random_unit_rows(rng, 9, 6)
    labels = np.array([0, 1, 1, 2, 3, 3, 3, 4, 0], np.int32) if with_labels else None
    expected = reference_ranking_loss(image_emb, text_emb, margin, hardest_negative, labels)
    loss = losses.ranking_loss(tf.constant(image_emb), tf.constant(text_emb), margin=margin,
                               hardest_negative=hardest_negative,
                               labels=None if labels is None else tf.constant(labels))
    assert loss.dtype == tf.float32
    assert loss.numpy() == pytest.approx(expected, rel=1e-5)


def test_same_label_rows_are_not_negatives():
    rng = np.random.default_rng(3)
    image_emb = random_unit_rows(rng, 6, 4)
    text_emb = random_unit_rows(rng, 6, 4)
    shared = np.array([5, 5, 7, 7, 9, 9], np.int32)
    unique = np.arange(6, dtype=np.int32)
    with_shared = losses.ranking_loss(image_emb, text_emb, margin=0.3, labels=shared)
    with_unique = losses.ranking_loss(image_emb, text_emb, margin=0.3, labels=unique)
    assert with_shared.numpy() == pytest.approx(
        reference_ranking_loss(image_emb, text_emb, 0.3, True, shared), rel=1e-5)
    assert with_unique.numpy() == pytest.approx(
        reference_ranking_loss(image_emb, text_emb, 0.3, True), rel=1e-5)
    assert with_shared.numpy() != pytest.approx(with_unique.numpy())
    all_same = losses.ranking_loss(image_emb, text_emb, margin=0.3, labels=np.zeros(6, np.int32))
    assert all_same.numpy() == 0.0


def test_ranking_loss_on_orthonormal_pairs():
    # s(i, i) = 1 and s(i, j) = 0: every hinge term is max(0, margin - 1).
    batch = 5
    identity = tf.eye(batch)
    assert losses.ranking_loss(identity, identity, margin=0.2).numpy() == 0.0
    hardest = losses.ranking_loss(identity, identity, margin=1.5, hardest_negative=True)
    summed = losses.ranking_loss(identity, identity, margin=1.5, hardest_negative=False)
    assert hardest.numpy() == pytest.approx(2 * 0.5)
    assert summed.numpy() == pytest.approx(2 * (batch - 1) * 0.5)


def test_ranking_loss_float16_embeddings_give_float32():
    rng = np.random.default_rng(5)
    image_emb = random_unit_rows(rng, 4, 8)
    text_emb = random_unit_rows(rng, 4, 8)
    loss = losses.ranking_loss(tf.constant(image_emb, tf.float16), tf.constant(text_emb, tf.float16))
    assert loss.dtype == tf.float32
    expected = reference_ranking_loss(image_emb.astype(np.float16), text_emb.astype(np.float16),
                                      0.2, True)
    assert loss.numpy() == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_instance_loss_matches_numpy_reference(dtype):
    rng = np.random.default_rng(11)
    logits = (3 * rng.standard_normal((8, 13))).astype(np.float32)
    labels = rng.integers(0, 13, size=8)
    loss = losses.instance_loss(tf.constant(logits, dtype), tf.constant(labels, tf.int64))
    assert loss.dtype == tf.float32
    expected = reference_instance_loss(np.asarray(tf.cast(tf.constant(logits, dtype), tf.float32)),
                                       labels)
    assert loss.numpy() == pytest.approx(expected, rel=1e-5)


# Runs in a fresh interpreter: logical devices must be configured before any TF op.
TWO_REPLICA_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from dual_path import losses

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    batch, features, dims, classes = 7, 5, 4, 3
    image_x = rng.standard_normal((batch, features)).astype(np.float32)
    text_x = rng.standard_normal((batch, features)).astype(np.float32)
    labels = np.array([0, 1, 1, 2, 0, 2, 1], np.int32)
    # Uneven replica batches: rows 0-3 on replica 0, rows 4-6 on replica 1.
    replica_rows = [slice(0, 4), slice(4, 7)]
    with strategy.scope():
        image_w = tf.Variable(rng.standard_normal((features, dims)).astype(np.float32))
        text_w = tf.Variable(rng.standard_normal((features, dims)).astype(np.float32))
        classifier_w = tf.Variable(rng.standard_normal((dims, classes)).astype(np.float32))
    variables = [image_w, text_w, classifier_w]

    def loss_and_gradients(image_x, text_x, labels, hardest_negative, use_labels):
        with tf.GradientTape() as tape:
            image_emb = tf.math.l2_normalize(image_x @ image_w, axis=1)
            text_emb = tf.math.l2_normalize(text_x @ text_w, axis=1)
            terms = [
                losses.ranking_loss(image_emb, text_emb, margin=0.5,
                                    hardest_negative=hardest_negative,
                                    labels=labels if use_labels else None),
                losses.instance_loss(image_emb @ classifier_w, labels),
                losses.instance_loss(text_emb @ classifier_w, labels),
            ]
            total = tf.add_n(terms)
        return terms, tape.gradient(total, variables)

    def replica_values(context):
        rows = replica_rows[context.replica_id_in_sync_group]
        return image_x[rows], text_x[rows], labels[rows]

    results = {}
    for hardest_negative in (True, False):
        for use_labels in (True, False):
            @tf.function
            def distributed(per_replica):
                terms, grads = strategy.run(
                    loss_and_gradients, args=per_replica + (hardest_negative, use_labels))
                reduce = lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, None)
                return [reduce(t) for t in terms], [reduce(g) for g in grads]

            per_replica = strategy.experimental_distribute_values_from_function(replica_values)
            two_terms, two_grads = distributed(tuple(per_replica))
            one_terms, one_grads = loss_and_gradients(
                image_x, text_x, labels, hardest_negative, use_labels)
            results[f"hardest={hardest_negative},labels={use_labels}"] = {
                "two_replica_terms": [float(t) for t in two_terms],
                "one_replica_terms": [float(t) for t in one_terms],
                "two_replica_grads": [g.numpy().ravel().tolist() for g in two_grads],
                "one_replica_grads": [g.numpy().ravel().tolist() for g in one_grads],
            }
    print("RESULTS " + json.dumps(results))
""")


@pytest.mark.subprocess
def test_two_replica_losses_and_gradients_equal_one_replica():
    completed = subprocess.run([sys.executable, "-c", TWO_REPLICA_SCRIPT],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(l for l in completed.stdout.splitlines() if l.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == 4
    for case, result in results.items():
        np.testing.assert_allclose(result["two_replica_terms"], result["one_replica_terms"],
                                   rtol=1e-5, err_msg=case)
        assert result["one_replica_terms"][0] > 0, case
        for two, one in zip(result["two_replica_grads"], result["one_replica_grads"]):
            assert np.abs(one).max() > 0, case
            np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6, err_msg=case)
