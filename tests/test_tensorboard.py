"""The tiny trained run's logs as TensorBoard serves them to a browser.

A `tensorboard` process on a free local port reads the run's logs/ folder; the test asks it
what the Projector, Scalars and Images tabs ask it (the plugins' HTTP routes), so a log layout
that TensorBoard does not take for runs fails here even when every file exists.
"""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dual_path import run_layout, tensorboard_extras

STARTUP_SECONDS = 120
STAGE_RUNS = ("stage1/validation", "stage2/validation")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TensorBoard:
    """GET requests to a running tensorboard's plugin routes, as JSON or bytes."""

    def __init__(self, url: str):
        self.url = url

    def get(self, route: str, **params) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{route}{query}", timeout=30) as response:
            return response.read()

    def json(self, route: str, **params):
        return json.loads(self.get(route, **params))


@pytest.fixture(scope="module")
def tensorboard(trained_run, tmp_path_factory):
    """A tensorboard process on trained_run's logs, once its projector lists runs."""
    port = _free_port()
    log_file = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("tensorboard")),
             f"--logdir={Path(trained_run.model_dir, 'logs')}", "--host=127.0.0.1",
             f"--port={port}", "--load_fast=false", "--reload_interval=1"],
            stdout=log, stderr=subprocess.STDOUT)
    board = TensorBoard(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None, log_file.read_text()[-3000:]
            try:
                if len(board.json("/data/plugin/projector/runs")) >= len(STAGE_RUNS):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, (
                f"the projector listed no runs within {STARTUP_SECONDS} s:\n"
                + log_file.read_text()[-3000:])
            time.sleep(1)
        yield board
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.subprocess
def test_projector_lists_each_stages_validation_embeddings_with_their_captions(tensorboard, trained_run):
    assert sorted(tensorboard.json("/data/plugin/projector/runs")) == list(STAGE_RUNS)
    for run in STAGE_RUNS:
        config = tensorboard.json("/data/plugin/projector/info", run=run)
        (embedding,) = config["embeddings"]
        assert embedding["tensorName"] == tensorboard_extras.PROJECTOR_TENSOR
        rows, width = (int(size) for size in embedding["tensorShape"])
        assert width == run_layout.load_model_config(trained_run.model_dir).head_dims[-1]
        values = np.frombuffer(tensorboard.get("/data/plugin/projector/tensor", run=run,
                                               name=embedding["tensorName"]), np.float32)
        assert values.shape == (rows * width,)
        np.testing.assert_allclose(np.linalg.norm(values.reshape(rows, width), axis=1), 1.0, atol=1e-5)
        metadata = tensorboard.get("/data/plugin/projector/metadata", run=run,
                                   name=embedding["tensorName"]).decode().splitlines()
        assert metadata[0] == "kind\timage\ttext" and len(metadata) == rows + 1
        kinds = [line.split("\t")[0] for line in metadata[1:]]
        captions = [line.split("\t")[2] for line in metadata[1:] if line.startswith("caption")]
        assert kinds.count("image") == 4 and kinds.count("caption") >= 4
        assert all(caption.strip() for caption in captions)


@pytest.mark.subprocess
def test_scalars_and_images_are_listed_and_stage2_follows_stage1_on_one_step_axis(
        tensorboard, trained_run):
    scalars = tensorboard.json("/data/plugin/scalars/tags")
    for stage in (1, 2):
        assert {"loss/loss", "loss/text_loss", "optimizer/learning_rate"} <= set(scalars[f"stage{stage}/train"])
        assert "retrieval/rsum" in scalars[f"stage{stage}/validation"]
    images = tensorboard.json("/data/plugin/images/tags")
    assert "retrieval_example/text_to_top5_images" in images["stage2/validation"]

    def steps(run, tag):
        return [point[1] for point in tensorboard.json("/data/plugin/scalars/scalars", run=run, tag=tag)]

    stage1_steps = run_layout.read_done_marker(trained_run.model_dir, 1)["step"]
    assert max(steps("stage1/train", "loss/loss")) == stage1_steps
    stage2 = steps("stage2/train", "loss/loss")
    assert min(stage2) > stage1_steps
    assert max(stage2) == stage1_steps + run_layout.read_done_marker(trained_run.model_dir, 2)["step"]
    assert min(steps("stage2/validation", "retrieval/rsum")) > stage1_steps


def test_projector_checkpoint_is_found_through_a_relative_checkpoint_file(trained_run):
    """The run folder can move: nothing in the projector files names an absolute path."""
    validation = Path(trained_run.model_dir, "logs", "stage2", "validation")
    for name in ("checkpoint", "projector_config.pbtxt"):
        assert trained_run.model_dir not in (validation / name).read_text()
    assert tf.train.latest_checkpoint(str(validation)).startswith(str(validation / "embedding-"))
