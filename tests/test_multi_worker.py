"""`--strategy=multi_worker` with a real cluster: two `experiments.train` worker processes on
127.0.0.1 (free ports chosen here, TF_CONFIG as users write it), on tiny synthetic shards.

Checks: both stages run and both workers exit 0; the chief alone writes the run's files
(the other worker only its scratch checkpoints, inside `.worker-*` folders); the first steps'
losses equal those of one process training the same global batch on the same number of
replicas; a cluster whose worker is killed mid-stage and started again with the same commands
resumes from the last checkpoint at the same stage, step and optimizer state.

Why the comparison run has two replicas: BatchNormalization normalises each replica's rows by
their own statistics (as MirroredStrategy does on GPUs), so a 2-replica run matches a
2-replica run, whether the replicas live in one process or in two.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dual_path import run_layout

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
BATCH = 8
NUM_TRAIN = 40  # 5 steps per epoch
TIMEOUT_SECONDS = 300
LOSS_TOLERANCE = 1e-4  # relative: summation order of the all-reduce differs between the runs
COMPARED_STEPS = 3
LOSSES = ("loss/loss", "loss/rank_loss", "loss/image_loss", "loss/text_loss")

FLAGS = [
    "--backbone=small_cnn", "--weights=none", f"--image_size={IMAGE_SIZE}",
    "--small_cnn_widths=8,16", "--embedding_dim=16", "--text_blocks=1,1", "--text_widths=16,32",
    "--head_dims=16,16", "--dropout=0", f"--batch_size={BATCH}", "--log_every_steps=1",
    "--noeval_flip_images", "--stage=both", "--stage1_epochs=1", "--stage1_loss_weights=1:1:1",
    "--stage2_epochs=2", "--stage2_lr_values=0.1,0.01", "--stage2_lr_boundaries=1",
    "--stage2_loss_weights=1:1:1", "--checkpoint_every_steps=2", "--projector_images=4",
]

# One process, two logical CPU replicas: the same trainer command under MirroredStrategy.
MIRRORED_SCRIPT = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from dual_path import training
    training.create_strategy = lambda name, tpu="": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    from experiments import train
    sys.argv = ["train", *sys.argv[1:]]
    train.run()
""")


@pytest.fixture(scope="module")
def shard_dir(synthetic_shards) -> str:
    return synthetic_shards("data", num_train=NUM_TRAIN, num_val=12, image_size=IMAGE_SIZE,
                            seed=0).shard_dir


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def _start_cluster(shard_dir: str, model_dir: Path, log_dir: Path, attempt: str) -> list:
    """The two workers' Popen objects, each logging to log_dir/<attempt>-worker<i>.log."""
    ports = _free_ports(2)
    workers = []
    for index in range(2):
        log = open(log_dir / f"{attempt}-worker{index}.log", "w")
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.train", f"--shard_dir={shard_dir}",
             f"--model_dir={model_dir}", "--strategy=multi_worker", *FLAGS],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CONFIG": _tf_config(ports, index), "PYTHONUNBUFFERED": "1"}))
    return workers


def _wait(workers: list, log_dir: Path, attempt: str) -> list[str]:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        for worker in workers:
            worker.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for worker in workers:
            worker.kill()
    return [(log_dir / f"{attempt}-worker{index}.log").read_text() for index in range(2)]


def _logged_losses(model_dir: Path, stage: int) -> dict:
    """{tag: [loss at step 1, 2, ...]} from the run's TensorBoard train events of `stage`."""
    by_step = {}
    for path in sorted((model_dir / "logs" / f"stage{stage}" / "train").iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag in LOSSES:
                    by_step.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return {tag: [steps[step] for step in sorted(steps)] for tag, steps in by_step.items()}


@pytest.fixture(scope="module")
def cluster_run(shard_dir, tmp_path_factory):
    """(model_dir, [worker 0 log, worker 1 log], return codes) of one uninterrupted cluster run."""
    root = tmp_path_factory.mktemp("cluster")
    model_dir = root / "run"
    workers = _start_cluster(shard_dir, model_dir, root, "run")
    logs = _wait(workers, root, "run")
    return model_dir, logs, [worker.returncode for worker in workers]


@pytest.mark.subprocess
def test_two_workers_train_both_stages_and_the_chief_alone_writes_the_run(cluster_run):
    model_dir, logs, codes = cluster_run
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for log in logs:
        assert "strategy multi_worker with 2 replicas" in log
        assert "stage 2 finished at step 10 (epoch 2)" in log
    results = json.loads((model_dir / run_layout.RESULTS_NAME).read_text())
    assert results["stage"] == 2 and np.isfinite(results["metrics"]["val"]["rsum"])
    assert run_layout.read_done_marker(str(model_dir), 2)["step"] == 10
    # The other worker writes only its scratch checkpoints, under .worker-worker-1.
    scratch = [path for path in model_dir.rglob("*") if ".worker-" in str(path)]
    assert scratch and all(".worker-worker-1" in str(path) for path in scratch)
    assert not any("worker-worker-1" in path.name for path in (model_dir / "logs").rglob("*"))


@pytest.mark.subprocess
def test_first_steps_losses_equal_one_process_with_two_replicas(cluster_run, shard_dir, tmp_path):
    model_dir, logs, codes = cluster_run
    assert codes == [0, 0]
    single_dir = tmp_path / "single"
    process = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, f"--shard_dir={shard_dir}",
         f"--model_dir={single_dir}", "--strategy=mirrored", *FLAGS],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "with 2 replicas" in process.stderr
    for stage in (1, 2):
        cluster, single = _logged_losses(model_dir, stage), _logged_losses(single_dir, stage)
        for tag in LOSSES:
            np.testing.assert_allclose(cluster[tag][:COMPARED_STEPS], single[tag][:COMPARED_STEPS],
                                       rtol=LOSS_TOLERANCE, err_msg=f"stage {stage} {tag}")
        assert cluster["loss/rank_loss"][0] > 0  # the ranking loss's cross-worker gather ran


@pytest.mark.subprocess
def test_a_killed_worker_is_resumed_from_the_last_checkpoint(shard_dir, tmp_path):
    model_dir = tmp_path / "run"
    workers = _start_cluster(shard_dir, model_dir, tmp_path, "first")
    chief_log = tmp_path / "first-worker0.log"
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        # Kill worker 1 once the chief has trained stage II's step 7 (step 6 was checkpointed).
        while "stage 2 | epoch 1.40/2 | step 7/10" not in chief_log.read_text():
            assert workers[0].poll() is None, chief_log.read_text()[-3000:]
            assert time.monotonic() < deadline, chief_log.read_text()[-3000:]
            time.sleep(0.2)
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait(timeout=60)
    finally:
        for worker in workers:  # the chief cannot go on without its peer: the cluster restarts
            worker.kill()
            worker.wait(timeout=60)
    assert not (model_dir / "stage2" / run_layout.DONE_MARKER).exists()

    logs = _wait(_start_cluster(shard_dir, model_dir, tmp_path, "second"), tmp_path, "second")
    for log in logs:
        assert "stage 1 already finished" in log, log[-3000:]
        resumed = [line for line in log.splitlines() if "stage 2: resumed from" in line]
        assert len(resumed) == 1, log[-3000:]
        resumed_step = int(resumed[0].split(" at step ")[1].split()[0])
        assert 6 <= resumed_step < 10 and "(epoch 1)" in resumed[0] and "lr 0.01" in resumed[0]
        assert "stage 2 finished at step 10 (epoch 2)" in log
    final = str(model_dir / "stage2" / "ckpt-10")
    assert tf.train.load_variable(final, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 10
    assert tf.train.load_variable(final, "stage/.ATTRIBUTES/VARIABLE_VALUE") == 2
    assert (model_dir / run_layout.RESULTS_NAME).exists()
