"""The benchmark scripts run end to end with tiny settings and write their JSON reports.

Nothing here judges speed: each script runs as a subprocess (`python -m
experiments.benchmarks.X --output_json=...`) on a tiny model and a tiny synthetic shard folder
written by the real data_prep code (data_pipeline on a few of ../shared's Flickr8k images,
skipped without it), and its report must name the machine, hold positive figures, and ratios
equal to the ratio of the figures they name.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import shared_data
from experiments import config_flags
from experiments.benchmarks import backbone_finetune, onednn, report, train_step

from conftest import tiny_model_flags

REPO = Path(__file__).resolve().parents[1]
SHARED_FLICKR8K = shared_data.FLICKR8K_RAW
IMAGE_SIZE = 32
# alpha pinned: the benchmarks' own model defaults are the Flickr8k run's.
TINY_MODEL_FLAGS = tiny_model_flags(alpha=None)
REPORT_KEYS = {"benchmark", "machine", "settings", "figures", "ratios", "date"}


@pytest.fixture(scope="module")
def dataset(synthetic_shards):
    """16 train + 8 val synthetic 32x32 images with captions (raw_dir, captions), and their
    shards (shard_dir, manifest)."""
    return synthetic_shards("data", num_train=16, num_val=8, image_size=IMAGE_SIZE, seed=0)


def run_benchmark(name: str, *args: str) -> str:
    """Runs experiments.benchmarks.<name> with args from the repository root; returns stdout."""
    process = subprocess.run([sys.executable, "-m", f"experiments.benchmarks.{name}", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return process.stdout


def check_report(path: Path, benchmark: str, figures: set, ratios: dict) -> dict:
    """The report at path, checked; ratios is {ratio name: (numerator figure, denominator figure)}."""
    written = json.loads(path.read_text())
    assert set(written) == REPORT_KEYS
    assert written["benchmark"] == benchmark
    machine = written["machine"]
    assert machine["logical_cores"] == os.cpu_count() and machine["cpu"]
    assert machine["memory_gib"] > 0 and machine["tensorflow"] and machine["keras"]
    assert isinstance(machine["gpus"], list)
    assert set(written["figures"]) == figures
    assert all(value > 0 for value in written["figures"].values()), written["figures"]
    assert set(written["ratios"]) == set(ratios)
    for name, (numerator, denominator) in ratios.items():
        assert written["ratios"][name] == pytest.approx(
            written["figures"][numerator] / written["figures"][denominator], rel=1e-9), name
    return written


TRAIN_STEP_FIGURES = {
    "dual_path_stage2_examples_per_s", "image_only_examples_per_s", "dual_path_stage1_images_examples_per_s",
    "dual_path_stage1_features_examples_per_s", "input_pipeline_examples_per_s",
    "pipeline_fed_stage2_examples_per_s", "trainer_loop_stage1_features_examples_per_s",
    "trainer_loop_stage2_examples_per_s"}
TRAIN_STEP_RATIOS = {
    "trainer_loop_over_step_stage1_features": ("trainer_loop_stage1_features_examples_per_s",
                                               "dual_path_stage1_features_examples_per_s"),
    "trainer_loop_over_step_stage2": ("trainer_loop_stage2_examples_per_s", "dual_path_stage2_examples_per_s"),
    "dual_path_stage2_over_image_only": ("dual_path_stage2_examples_per_s", "image_only_examples_per_s"),
    "dual_path_stage1_images_over_stage2": ("dual_path_stage1_images_examples_per_s",
                                            "dual_path_stage2_examples_per_s"),
    "dual_path_stage1_features_over_images": ("dual_path_stage1_features_examples_per_s",
                                              "dual_path_stage1_images_examples_per_s"),
    "input_pipeline_over_dual_path_stage2": ("input_pipeline_examples_per_s", "dual_path_stage2_examples_per_s"),
    "pipeline_fed_over_in_memory_stage2": ("pipeline_fed_stage2_examples_per_s",
                                           "dual_path_stage2_examples_per_s"),
}


@pytest.mark.subprocess
def test_train_step_times_the_trainers_steps_and_the_pipeline_fed_by_the_shards(dataset, tmp_path):
    output = tmp_path / "results" / "train_step.json"
    stdout = run_benchmark("train_step", *TINY_MODEL_FLAGS, "--stage1_loss_weights=0:1:1",
                           "--batch_size=4", "--warmup_steps=1", "--steps=2", "--pipeline_batches=2",
                           f"--shard_dir={dataset.shard_dir}", f"--output_json={output}")
    written = check_report(output, "train_step", TRAIN_STEP_FIGURES, TRAIN_STEP_RATIOS)
    settings = written["settings"]
    # The model is sized by the shards' manifest; the cached features are the backbone's (small_cnn: 16-d).
    for name in ("vocab_size", "num_classes", "max_length"):
        assert settings[name] == dataset.manifest[name], name
    assert f"{dataset.manifest['num_classes']} classes, vocabulary {dataset.manifest['vocab_size']}" in stdout
    assert "(16-d features)" in stdout and "stage I loss weights 0:1:1" in stdout
    assert "(f) trainer's loop (50 steps a call)" in stdout
    assert settings["batch_size"] == 4 and settings["weights"] is None
    # flickr8k.flags' --stage2_batch_size=64 is set aside: every step is timed on batches of 4.
    assert [stage["batch_size"] for stage in settings["timed_stages"]] == [None, None, None]
    assert settings["text_widths"] == [16, 32] and settings["head_dims"] == [16, 16]
    assert f"report written to {output}" in stdout
    assert f"{os.cpu_count()} logical cores, TensorFlow" in stdout


def flagfile_values(path: Path) -> dict:
    """--name=value of a flagfile, the flagfiles it names read in place (later lines win)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("--flagfile="):
            values.update(flagfile_values(REPO / line.split("=", 1)[1]))
        elif line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            values[name] = value
    return values


def test_benchmarks_read_the_training_flagfile_with_overrides(monkeypatch, capsys):
    """The benchmarks' model and settings are the training command's, from its flags: by
    default experiments/configs/flickr8k.flags (the flagfiles it names included), and any
    training flag on the command line overrides it; an unknown one is an error naming it."""
    parser = argparse.ArgumentParser()
    train_step.add_config_arguments(parser)
    monkeypatch.setattr(sys, "argv", ["train_step", "--head_dims=8,8", "--stage1_epochs=3"])
    _, flag_values = train_step.parse_config_flags(parser)
    model = config_flags.model_settings(flag_values)
    expected = flagfile_values(REPO / train_step.DEFAULT_CONFIG)
    assert model["text_blocks"] == tuple(int(part) for part in expected["text_blocks"].split(","))
    assert (model["backbone"], model["weights"], model["alpha"]) == (
        expected["backbone"], expected["weights"], float(expected["alpha"]))
    assert model["head_dims"] == (8, 8) and flag_values.stage1_epochs == 3
    assert flag_values.stage2_backbone_trainable_blocks == int(expected["stage2_backbone_trainable_blocks"])
    assert flag_values.shard_dir == train_step.DEFAULT_SHARD_DIR
    monkeypatch.setattr(sys, "argv", ["train_step", "--no_such_flag=1"])
    with pytest.raises(SystemExit):
        train_step.parse_config_flags(parser)
    assert "no_such_flag" in capsys.readouterr().err


def test_train_step_without_shards_says_how_to_build_them_and_times_nothing(tmp_path):
    output = tmp_path / "train_step.json"
    process = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.train_step", *TINY_MODEL_FLAGS,
         "--batch_size=2", f"--shard_dir={tmp_path / 'no_shards'}", f"--output_json={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert f"{tmp_path / 'no_shards'} holds no shards: nothing is timed" in process.stdout
    assert "dual-path-build-shards --source_format=flickr_tokens" in process.stdout
    assert not output.exists()


@pytest.mark.subprocess
def test_export_encode_compares_the_saved_model_with_the_keras_encoders(dataset, tmp_path):
    output = tmp_path / "export_encode.json"
    stdout = run_benchmark("export_encode", *TINY_MODEL_FLAGS, f"--shard_dir={dataset.shard_dir}",
                           "--source_format=karpathy", f"--captions={dataset.captions}",
                           f"--image_root={dataset.raw_dir}", "--split_files=", "--max_images=8",
                           "--batch_size=4", f"--output_json={output}")
    written = check_report(output, "export_encode", {
        "saved_model_image_tensors_images_per_s", "keras_image_tensors_images_per_s",
        "saved_model_jpeg_images_per_s", "keras_jpeg_images_per_s", "saved_model_sentences_captions_per_s",
        "keras_token_ids_captions_per_s", "keras_python_tokenize_captions_per_s"}, {
        "saved_model_over_keras_image_tensors": ("saved_model_image_tensors_images_per_s",
                                                 "keras_image_tensors_images_per_s"),
        "saved_model_over_keras_jpeg": ("saved_model_jpeg_images_per_s", "keras_jpeg_images_per_s"),
        "saved_model_sentences_over_keras_token_ids": ("saved_model_sentences_captions_per_s",
                                                       "keras_token_ids_captions_per_s"),
        "saved_model_sentences_over_keras_python_tokenize": ("saved_model_sentences_captions_per_s",
                                                             "keras_python_tokenize_captions_per_s"),
    })
    for name in ("image tensor", "JPEG", "sentence"):
        assert f"{name}: max |SavedModel - Keras| = " in stdout
    assert written["settings"]["images"] == 8 and written["settings"]["captions"] == 40
    assert written["settings"]["vocab_size"] == dataset.manifest["vocab_size"]


@pytest.mark.subprocess
def test_data_pipeline_reports_on_a_few_flickr8k_images(tmp_path):
    if not SHARED_FLICKR8K.is_dir():
        pytest.skip(f"{SHARED_FLICKR8K} is absent")
    output = tmp_path / "data_pipeline.json"
    run_benchmark("data_pipeline", "--max_images=16", "--num_workers=1", "--embedding_dim=8",
                  "--batch_size=4", "--image_size=32", "--warmup_batches=1", "--timed_batches=2",
                  f"--output_json={output}")
    written = check_report(output, "data_pipeline", {
        "raw_jpeg_decode_images_per_s", "build_shards_images_per_s", "build_shards_seconds",
        "word2vec_seconds", "train_dataset_examples_per_s"}, {
        "train_dataset_over_raw_jpeg_decode": ("train_dataset_examples_per_s", "raw_jpeg_decode_images_per_s"),
        "word2vec_share_of_build_shards": ("word2vec_seconds", "build_shards_seconds"),
    })
    assert written["settings"]["images"] == 16 and written["settings"]["written_images"] == 16
    assert written["ratios"]["word2vec_share_of_build_shards"] < 1


@pytest.mark.subprocess
def test_retrieval_metrics_report(tmp_path):
    output = tmp_path / "retrieval_metrics.json"
    stdout = run_benchmark("retrieval_metrics", "--images=50", "--captions=5", f"--output_json={output}")
    assert "identical metrics" in stdout
    written = check_report(output, "retrieval_metrics", {
        "retrieval_metrics_seconds", "retrieval_metrics_5_folds_seconds", "argsort_reference_seconds"}, {
        "argsort_reference_over_retrieval_metrics": ("argsort_reference_seconds", "retrieval_metrics_seconds"),
        "retrieval_metrics_5_folds_over_1_fold": ("retrieval_metrics_5_folds_seconds",
                                                  "retrieval_metrics_seconds"),
    })
    assert written["settings"]["texts"] == 250


def test_write_report_refuses_figures_that_are_not_flat_numbers(tmp_path):
    path = tmp_path / "report.json"
    for figures in ({"seconds": {"nested": 1.0}}, {"seconds": float("nan")}, {"seconds": True}):
        with pytest.raises(ValueError, match="figures must map names to finite numbers"):
            report.write_report(str(path), "x", figures, {}, {})
    assert not path.exists()
    report.write_report(str(path), "x", {"a_seconds": 2.0}, {"a_over_a": 1.0}, {"flag": "value"})
    written = json.loads(path.read_text())
    assert written["figures"] == {"a_seconds": 2.0} and written["settings"] == {"flag": "value"}
    assert written["machine"] == report.machine()


def test_reports_name_paths_relative_to_the_repository_or_shared(tmp_path):
    settings = {"weights": str(shared_data.SHARED / "weights" / "w.h5"),
                "split_files": f"train={shared_data.SHARED}/a.txt,dev={shared_data.SHARED}/b.txt",
                "shard_dir": str(shared_data.REPO / "workspace" / "shards"), "other": "/data/x",
                "sizes": [str(shared_data.REPO / "a"), 3], "batch_size": 32}
    path = tmp_path / "report.json"
    report.write_report(str(path), "train_step", {"steps": 1}, {}, settings)
    assert json.loads(path.read_text())["settings"] == {
        "weights": "../shared/weights/w.h5", "split_files": "train=../shared/a.txt,dev=../shared/b.txt",
        "shard_dir": "workspace/shards", "other": "/data/x", "sizes": ["a", 3], "batch_size": 32}


def test_committed_results_name_no_path_of_this_checkout():
    results = [shared_data.REPO / "experiments" / "RESULTS.md", shared_data.REPO / "README.md",
               *sorted((shared_data.REPO / "experiments" / "results").rglob("*.json"))]
    for path in results:
        text = path.read_text(encoding="utf-8")
        assert str(shared_data.REPO) not in text and str(shared_data.SHARED) not in text, path


@pytest.mark.subprocess
def test_backbone_finetune_times_the_top_blocks_against_the_whole_backbone(tmp_path):
    output = tmp_path / "backbone_finetune.json"
    # Stage II's batch size (flickr8k.flags gives it one of its own, which --batch_size leaves).
    stdout = run_benchmark("backbone_finetune", *TINY_MODEL_FLAGS, "--trainable_blocks=1,0",
                           "--stage2_batch_size=2", "--warmup_steps=1", "--steps=1",
                           f"--output_json={output}")
    written = check_report(
        output, "backbone_finetune",
        {"whole_backbone_images_per_s", "top_1_blocks_images_per_s", "top_0_blocks_images_per_s",
         "forward_inference_images_per_s"},
        {"top_1_blocks_over_whole_backbone": ("top_1_blocks_images_per_s", "whole_backbone_images_per_s"),
         "top_0_blocks_over_whole_backbone": ("top_0_blocks_images_per_s", "whole_backbone_images_per_s"),
         "forward_inference_over_whole_backbone": ("forward_inference_images_per_s",
                                                   "whole_backbone_images_per_s")})
    # small_cnn's last block is conv2, bn2, relu2, then the pool: 4 layers; 0 blocks: none.
    assert written["settings"]["trained_layers"] == {"1": 4, "0": 0}
    assert "last 1 blocks (  4 layers)" in stdout and "small_cnn at 32 px, batch 2" in stdout


@pytest.mark.subprocess
def test_onednn_runs_a_benchmark_with_onednn_off_then_on_and_reports_both(tmp_path):
    output = tmp_path / "onednn.json"
    stdout = run_benchmark("onednn", "--benchmark=backbone_finetune", f"--output_json={output}", "--",
                           *TINY_MODEL_FLAGS, "--trainable_blocks=1", "--stage2_batch_size=2",
                           "--warmup_steps=1", "--steps=1")
    timed = ("whole_backbone_images_per_s", "top_1_blocks_images_per_s", "forward_inference_images_per_s")
    written = check_report(
        output, "onednn", {f"{name}_onednn_{setting}" for name in timed for setting in ("off", "on")},
        {f"{name}_on_over_off": (f"{name}_onednn_on", f"{name}_onednn_off") for name in timed})
    assert written["settings"]["benchmark"] == "backbone_finetune"
    assert written["settings"]["settings_onednn_off"]["batch_size"] == 2
    assert "output_json" not in written["settings"]["settings_onednn_off"]  # a removed folder
    assert "top_1_blocks_images_per_s" in stdout and "on/off" in stdout
    with pytest.raises(SystemExit):
        onednn._parse_args(["--benchmark=train_step", "--", "--output_json=x.json"])


def test_backbone_finetune_times_the_configs_top_blocks_by_default(monkeypatch):
    """Without --trainable_blocks the benchmark times the blocks stage II trains, read from the
    training config, against none: the count is declared once, in the flagfile."""
    monkeypatch.setattr(sys, "argv", ["backbone_finetune", *TINY_MODEL_FLAGS,
                                      "--stage2_backbone_trainable_blocks=1"])
    args, _ = backbone_finetune._parse_args()
    assert args.trainable_blocks == (1, 0)
    monkeypatch.setattr(sys, "argv", ["backbone_finetune"])
    args, _ = backbone_finetune._parse_args()
    # experiments/configs/flickr8k.flags: its stage II's blocks and batch size (not --batch_size).
    assert (args.trainable_blocks, args.batch_size) == ((10, 0), 64)
