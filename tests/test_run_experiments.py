"""The ablation runner: its registry against the trainer's flags, and real runs on tiny data.

Every row's command is parsed by experiments.train's own flag definitions (in a subprocess)
and must give the settings the row names. One row trains for real through the runner on a
tiny synthetic dataset (shards written here by data_prep, 32x32 images, a tiny model via
--extra_flags) and must leave a record whose results are the run's results.json; a second
invocation skips that row and stops at a failing row with an error naming it and its log,
writing no record for it (after removing what a different command had left in its model_dir).
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import shared_data
from experiments import run_experiments

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
# A tiny model and a one-epoch stage I on 40 images: the run takes seconds.
TINY_EXTRA_FLAGS = [
    f"--image_size={IMAGE_SIZE}", "--small_cnn_widths=8,16", "--embedding_dim=16",
    "--text_blocks=1,1", "--text_widths=16,32", "--head_dims=16,16", "--batch_size=8",
    "--stage1_epochs=1", "--validate_every_epochs=1", "--log_every_steps=5",
    "--checkpoint_every_steps=0", "--projector_images=4",
]
WATCHED_FLAGS = ["stage", "stage1_epochs", "stage1_loss_weights", "share_classifier",
                 "position_shift", "text_blocks", "text_widths", "evaluate_test",
                 "word_embedding_init", "stage1_feature_views", "backbone",
                 "stage2_hardest_negative", "stage1_from", "hardest_negative", "classifier",
                 "classifier_init", "dropout", "alpha", "weights", "stage2_backbone_trainable_blocks",
                 "stage2_backbone_lr_multiplier", "stage2_backbone_bn_lr_multiplier",
                 "stage2_first_conv_lr_multiplier", "stage2_epochs", "stage2_lr_boundaries",
                 "stage2_lr_values", "stage2_loss_weights", "stage2_backbone_bn_frozen",
                 "embedding_lr_multiplier", "backbone_bn_statistics", "stage2_precise_bn",
                 "stage2_weight_average_momentum", "validate_every_epochs", "batch_size",
                 "stage2_batch_size", "stage1_lr_values", "stage1_lr_boundaries", "stage1_optimizer",
                 "stage2_optimizer"]

_PARSE_SCRIPT = """
import json, sys
from absl import flags
from experiments import train
train.define_flags()
FLAGS = flags.FLAGS
parsed = {}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        FLAGS(["train", *argv])
        parsed[name] = {"values": {flag: FLAGS[flag].value for flag in json.loads(sys.argv[2])}}
    except flags.UnrecognizedFlagError as error:
        parsed[name] = {"unknown": error.flagname}
    FLAGS.unparse_flags()
print(json.dumps(parsed))
"""


def row_command(row: run_experiments.Row, workspace: str = "workspace") -> list[str]:
    return run_experiments.train_command(
        row, shard_dir=run_experiments.default_shard_dir(workspace, row.dataset),
        run_dir=run_experiments.model_dir(workspace, row.dataset, row.name),
        cache_dir=run_experiments.feature_cache_dir(workspace, row.dataset))


@pytest.fixture(scope="module")
def parsed_rows() -> dict:
    """"dataset/row" -> {"values": {flag: value}} or {"unknown": flag name}, from the trainer's
    flags parsing each row's command (without "python -m experiments.train") in the repo root."""
    commands = {f"{row.dataset}/{row.name}": row_command(row)[3:]
                for rows in run_experiments.ROWS.values() for row in rows.values()}
    process = subprocess.run(
        [sys.executable, "-c", _PARSE_SCRIPT, json.dumps(commands), json.dumps(WATCHED_FLAGS)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


EXPECTED = {
    # row: (stage1 loss weights, share_classifier, position_shift, text_blocks)
    "both": ("1:1:1", True, True, None),
    "ranking_only": ("1:0:0", True, True, None),
    "instance_only": ("0:1:1", True, True, None),
    "separate_classifiers": ("1:1:1", False, True, None),
    "no_position_shift": ("1:1:1", True, False, None),
    "random_word_init": ("1:1:1", True, True, None),
    "instance_only_paper": ("0:1:1", True, True, None),
    "both_paper": ("1:1:1", True, True, None),
    "instance_only_dense": ("0:1:1", True, True, None),
    "deep_text": ("1:1:1", True, True, ["3", "4", "6", "1"]),
}
# The classifier each row trains: (classifier, classifier_init); the config's otherwise.
EXPECTED_CLASSIFIER = {"instance_only_paper": ("dense", "random"), "both_paper": ("dense", "random"),
                       "instance_only_dense": ("dense", "imprint")}
# The ablation flagfiles' stage I budgets (epochs), at which every row has stopped improving.
ABLATION_EPOCHS = {"flickr8k": 60, "synthetic": 24}


def test_registry_rows_and_their_flagfiles():
    assert list(run_experiments.ROWS["flickr8k"]) == [
        "main", "main_stage2_20_epochs", "main_stage1_adam_2e_4", "main_stage1_sgd", "main_stage2_batch_32", "main_mobilenet_0_25", "main_stage2_lr_0_01", "main_stage2_7_blocks",
        "main_stage2_10_epochs",
        "main_no_finetune",
        "main_no_finetune_20_epochs", "main_stage1_only",
        "main_stage1_word2vec_captions", "main_stage1_random_word_init", "main_stage2_hardest",
        "main_held_out", "main_held_out_stage2_hardest", "main_held_out_stage2_20_epochs",
        "main_held_out_stage2_backbone_lr_1", "main_held_out_stage2_10_blocks",
        "main_held_out_stage2_13_blocks", "main_held_out_stage2_lr_0_02",
        "main_held_out_stage2_lr_0_04", "main_held_out_stage2_lr_0_02_rerun",
        "main_held_out_stage2_bn_frozen", "main_held_out_stage2_loss_weights_2_1_0_1",
        "main_held_out_stage2_warmup", "main_held_out_stage2_head_lr_0_01",
        "main_held_out_stage2_weight_average", "main_held_out_stage2_recipe",
        "main_held_out_stage2_25_epochs", "main_held_out_stage2_drop_after_12",
        "main_held_out_stage2_recipe_rerun", "main_held_out_stage2_13_blocks_lr_0_02",
        "main_held_out_stage2_dropout_0_5", "main_held_out_stage2_batch_64",
        "main_held_out_stage2_recipe_batch_64",
        "main_held_out_stage1_curve", "main_held_out_stage1_wide_text",
        "main_held_out_stage1_batch_64", "main_held_out_stage1_lr_0_1",
        "main_held_out_stage1_adam", "main_held_out_stage1_adam_lr_5e_4",
        "main_held_out_stage1_adam_lr_1e_3",
        "main_held_out_stage2_from_adam", "main_held_out_stage2_from_adam_lr_5e_4",
        "main_held_out_stage2_16_epochs", "main_held_out_stage2_12_epochs",
        "main_held_out_embedding_lr_1",
        "main_held_out_bn_training_views",
        "main_held_out_bn_stage2_top", "both",
        "ranking_only", "instance_only",
        "separate_classifiers", "no_position_shift", "random_word_init", "instance_only_paper",
        "both_paper", "instance_only_dense", "deep_text"]
    assert list(run_experiments.ROWS["synthetic"]) == [
        "both", "ranking_only", "instance_only", "separate_classifiers", "no_position_shift",
        "random_word_init", "instance_only_paper", "both_paper", "instance_only_dense", "deep_text"]
    for rows in run_experiments.ROWS.values():
        for row in rows.values():
            assert row.description and "\n" not in row.description
            for flagfile in row.flagfiles:
                assert (REPO / flagfile).is_file(), flagfile
    main = run_experiments.ROWS["flickr8k"]["main"]
    assert main.flagfiles == ("experiments/configs/flickr8k.flags",) and not main.flags
    assert main.word_vectors == run_experiments.GLOVE
    # The instance-loss ablations ran on the recipe before MobileNetV2 and GloVe.
    before = run_experiments.ROWS["flickr8k"]["main_mobilenet_0_25"]
    assert before.flagfiles == (run_experiments.FLICKR8K_MOBILENET_0_25_CONFIG,)
    assert run_experiments.ROWS["flickr8k"]["both"].flagfiles[0] == before.flagfiles[0]
    assert before.word_vectors == "captions" and not before.flags
    # The word vector ablation trains on shards of its own, the others on the main run's.
    word_vectors = {name: row.word_vectors for name, row in run_experiments.ROWS["flickr8k"].items()
                    if name.startswith("main_stage")}
    assert word_vectors == {"main_stage1_only": "glove", "main_stage1_word2vec_captions": "captions",
                            "main_stage1_random_word_init": "glove", "main_stage2_hardest": "glove",
                            "main_stage2_10_epochs": "glove", "main_stage2_7_blocks": "glove",
                            "main_stage2_lr_0_01": "glove", "main_stage2_batch_32": "glove",
                            "main_stage1_sgd": "glove", "main_stage1_adam_2e_4": "glove",
                            "main_stage2_20_epochs": "glove"}
    # Stage II's ranking loss is chosen on the split held out of train, with the main recipe.
    held_out = run_experiments.ROWS["flickr8k"]["main_held_out_stage2_hardest"]
    assert held_out.held_out and held_out.stage1_from_row == "main_held_out"
    assert held_out.word_vectors == "glove" and "--stage2_hardest_negative" in held_out.flags


def test_commands_put_extra_flags_last_and_cache_features_for_flickr8k_ablations(tmp_path):
    rows = run_experiments.ROWS
    command = run_experiments.train_command(
        rows["flickr8k"]["ranking_only"], shard_dir=str(REPO / "workspace/f/shards"),
        run_dir=str(REPO / "workspace/experiments/flickr8k/ranking_only"),
        cache_dir=str(tmp_path / "cache"), extra_flags=["--stage1_epochs=1"])
    assert command == [
        "python", "-m", "experiments.train",
        "--flagfile=experiments/configs/flickr8k_mobilenet_0_25.flags",
        "--flagfile=experiments/configs/ablations/flickr8k.flags",
        "--stage1_loss_weights=1:0:0",
        "--shard_dir=workspace/f/shards",
        "--model_dir=workspace/experiments/flickr8k/ranking_only",
        f"--feature_cache_dir={tmp_path / 'cache'}",
        "--stage1_epochs=1"]
    assert any(part.startswith("--feature_cache_dir") for part in row_command(rows["flickr8k"]["main"]))
    assert not any(part.startswith("--feature_cache_dir") for part in row_command(rows["synthetic"]["both"]))
    assert run_experiments.selected_rows("synthetic", ["deep_text", "both"]) == [
        rows["synthetic"]["deep_text"], rows["synthetic"]["both"]]
    with pytest.raises(ValueError, match="unknown synthetic rows \\['main'\\]"):
        run_experiments.selected_rows("synthetic", ["main"])


@pytest.mark.subprocess
def test_every_row_parses_with_the_trainer_flags(parsed_rows):
    """Every row's command parses, to the settings the row names."""
    for name, outcome in parsed_rows.items():
        dataset, row = name.split("/")
        assert "unknown" not in outcome, (name, outcome)
        values = outcome["values"]
        if row == "main":
            assert values["stage"] == "both" and values["stage1_loss_weights"] == "1:1:1"
            assert (values["backbone"], values["alpha"]) == ("MobileNetV2", 1.0)
            assert values["weights"] == "../shared/weights/mobilenet_v2_1.0_224_no_top.weights.h5"
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (16, ["12"])
            # Stage II on batches of 64 at twice the rate; stage I on the run's 32.
            assert (values["batch_size"], values["stage2_batch_size"]) == (32, 64)
            assert values["stage2_lr_values"] == ["0.04", "0.004"]
            assert values["embedding_lr_multiplier"] == 0.001
            assert values["backbone_bn_statistics"] == "pretrained"
            assert values["stage2_precise_bn"] is True
            assert values["stage2_weight_average_momentum"] is None
            # Stage I on Adam at 5e-4, stage II on the original's SGD.
            assert values["stage1_optimizer"] == "adam" and values["stage2_optimizer"] == "matconvnet_sgd"
            assert values["stage1_lr_values"] == ["5e-4", "5e-5"]
            assert (values["stage1_epochs"], values["stage1_lr_boundaries"]) == (60, ["50"])
            continue
        # Every row of the MobileNetV2 recipe that trains stage I ran before the held-out split
        # chose Adam and says so (SGD at 0.05), except the probes of stage I's rate and optimizer,
        # the main run on Adam at 2e-4 and the one on 5e-4 with 20 epochs of stage II.
        if dataset == "flickr8k" and values["stage"] in ("both", "1"):
            on_adam = "_adam" in row or row == "main_stage2_20_epochs"
            assert values["stage1_optimizer"] == ("adam" if on_adam else "matconvnet_sgd"), name
            if row == "main_stage1_adam_2e_4":
                assert values["stage1_lr_values"] == ["2e-4", "2e-5"], name
            elif row == "main_stage2_20_epochs":
                assert values["stage1_lr_values"] == ["5e-4", "5e-5"], name
            elif not row.endswith(("_adam", "_adam_lr_5e_4", "_adam_lr_1e_3", "_stage1_lr_0_1",
                                   "_stage1_batch_64")):
                assert values["stage1_lr_values"] == ["0.05", "0.005"], name
        if row in ("main_stage1_sgd", "main_stage1_adam_2e_4", "main_stage2_20_epochs"):
            # The main recipe as it stood before Adam, before Adam at 5e-4 and before 16 epochs
            # of stage II.
            assert values["stage"] == "both" and values["stage2_batch_size"] == 64
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (20, ["16"])
            assert values["stage2_lr_values"] == ["0.04", "0.004"]
            assert values["stage2_precise_bn"] is True and values["stage2_optimizer"] == "matconvnet_sgd"
            continue
        # Every row that trains stage II ran before the held-out split chose precise BN and says
        # so, except main_stage2_batch_32 and main_stage2_hardest, stage II of that run again,
        # and the held-out probes of stage II that ran after it. Every row of the MobileNetV2
        # recipe that trains stage II ran before the split chose batches of 64 and says so,
        # except the two probes that chose them and the probes after them.
        if values["stage"] in ("both", "2") and row != "main_mobilenet_0_25":
            assert values["stage2_batch_size"] == (
                64 if row.endswith(("_batch_64", "_from_adam", "_from_adam_lr_5e_4", "_16_epochs",
                                    "_12_epochs"))
                else 32), name
        if values["stage"] in ("both", "2"):
            assert values["stage2_precise_bn"] is (
                row in ("main_stage2_batch_32", "main_stage2_hardest", "main_held_out_stage2_warmup",
                        "main_held_out_stage2_head_lr_0_01",
                        "main_held_out_stage2_weight_average",
                        "main_held_out_stage2_recipe",
                        "main_held_out_stage2_25_epochs",
                        "main_held_out_stage2_drop_after_12",
                        "main_held_out_stage2_recipe_rerun",
                        "main_held_out_stage2_13_blocks_lr_0_02",
                        "main_held_out_stage2_dropout_0_5",
                        "main_held_out_stage2_batch_64",
                        "main_held_out_stage2_recipe_batch_64",
                        "main_held_out_stage2_from_adam",
                        "main_held_out_stage2_from_adam_lr_5e_4",
                        "main_held_out_stage2_16_epochs",
                        "main_held_out_stage2_12_epochs")), name
        ran_at_lr_0_01 = (row.startswith(("main_stage2_", "main_no_finetune", "main_held_out"))
                          and row not in ("main_stage2_batch_32", "main_stage2_hardest",
                                          "main_held_out_stage2_lr_0_02",
                                          "main_held_out_stage2_lr_0_04",
                                          "main_held_out_stage2_lr_0_02_rerun",
                                          "main_held_out_stage2_bn_frozen",
                                          "main_held_out_stage2_loss_weights_2_1_0_1",
                                          "main_held_out_stage2_warmup",
                                          "main_held_out_stage2_weight_average",
                                          "main_held_out_stage2_recipe",
                                          "main_held_out_stage2_25_epochs",
                                          "main_held_out_stage2_drop_after_12",
                                          "main_held_out_stage2_recipe_rerun",
                                          "main_held_out_stage2_13_blocks_lr_0_02",
                                          "main_held_out_stage2_dropout_0_5",
                                          "main_held_out_stage2_batch_64",
                                          "main_held_out_stage2_recipe_batch_64",
                                          "main_held_out_stage1_curve",
                                          "main_held_out_stage1_wide_text",
                                          "main_held_out_stage1_batch_64",
                                          "main_held_out_stage1_lr_0_1",
                                          "main_held_out_stage1_adam",
                                          "main_held_out_stage1_adam_lr_5e_4",
                                          "main_held_out_stage1_adam_lr_1e_3",
                                          "main_held_out_stage2_from_adam",
                                          "main_held_out_stage2_from_adam_lr_5e_4",
                                          "main_held_out_stage2_16_epochs",
                                          "main_held_out_stage2_12_epochs",
                                          "main_held_out_embedding_lr_1",
                                          "main_held_out_bn_training_views",
                                          "main_held_out_bn_stage2_top"))
        if ran_at_lr_0_01:
            # The rows that ran before the held-out split chose 0.02 say so.
            assert values["stage2_lr_values"] == ["0.01", "0.001"], name
        if row == "main_stage2_batch_32":
            # The main recipe as it stood before batches of 64.
            assert values["stage"] == "both" and values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_lr_values"] == ["0.02", "0.002"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (20, ["16"])
            assert values["stage2_precise_bn"] is True
            continue
        if row == "main_stage2_lr_0_01":
            assert values["stage"] == "both" and values["stage2_backbone_trainable_blocks"] == 10
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (20, ["16"])
            continue
        if row == "main_stage2_7_blocks":
            assert values["stage"] == "both" and values["stage2_backbone_trainable_blocks"] == 7
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (20, ["16"])
            continue
        if row in ("main_stage2_10_epochs", "main_no_finetune"):
            assert values["stage"] == "2"
            assert values["stage2_backbone_trainable_blocks"] == (0 if row == "main_no_finetune" else 7)
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            assert values["stage1_from"] == "workspace/experiments/flickr8k/main_stage2_7_blocks"
            continue
        if row == "main_no_finetune_20_epochs":
            assert values["stage"] == "2" and values["stage2_backbone_trainable_blocks"] == 0
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (20, ["16"])
            assert values["stage1_from"] == "workspace/experiments/flickr8k/main_stage2_7_blocks"
            continue
        if row.startswith("main_stage1_"):
            assert values["stage"] == "1" and values["backbone"] == "MobileNetV2", name
            assert values["word_embedding_init"] == ("random" if row.endswith("random_word_init")
                                                     else "word2vec"), name
            continue
        if row == "main_mobilenet_0_25":
            assert (values["backbone"], values["alpha"]) == ("MobileNet", 0.25)
            assert values["stage2_backbone_trainable_blocks"] is None
            assert values["stage2_backbone_lr_multiplier"] == 0.1
            assert values["stage2_backbone_bn_lr_multiplier"] is None
            assert values["stage2_first_conv_lr_multiplier"] is None
            continue
        on_10_blocks = ("_10_blocks", "_13_blocks", "_lr_0_02", "_lr_0_04", "_rerun", "_bn_frozen",
                        "_2_1_0_1", "_warmup", "_head_lr_0_01", "_weight_average", "_recipe",
                        "_25_epochs", "_drop_after_12", "_dropout_0_5", "_batch_64",
                        "_stage1_curve", "_stage1_wide_text", "_stage1_lr_0_1", "_stage1_adam",
                        "_adam_lr_5e_4", "_adam_lr_1e_3", "_from_adam", "_16_epochs", "_12_epochs",
                        "_embedding_lr_1", "_bn_training_views", "_bn_stage2_top")
        if row.startswith("main_held_out") and not row.endswith(on_10_blocks):
            # The held-out rows that ran before the split chose 10 blocks say so.
            assert values["stage2_backbone_trainable_blocks"] == 7, name
        if row == "main_held_out":
            assert values["stage"] == "both" and values["stage2_backbone_trainable_blocks"] == 7
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row == "main_held_out_stage2_hardest":
            assert values["stage"] == "2" and values["stage2_hardest_negative"] is True
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            assert values["stage1_from"] == "workspace/experiments/flickr8k/main_held_out"
            continue
        if row == "main_held_out_stage2_20_epochs":
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            continue
        if row == "main_held_out_stage2_backbone_lr_1":
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_lr_multiplier"] == 1.0
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row in ("main_held_out_stage2_10_blocks", "main_held_out_stage2_13_blocks"):
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_trainable_blocks"] == int(row.split("_")[-2])
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row in ("main_held_out_stage2_lr_0_02", "main_held_out_stage2_lr_0_04"):
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            assert values["stage2_lr_values"] == (["0.02", "0.002"] if row.endswith("_lr_0_02")
                                                  else ["0.04", "0.004"])
            continue
        if row in ("main_held_out_stage2_lr_0_02_rerun", "main_held_out_stage2_bn_frozen"):
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_bn_frozen"] is row.endswith("_bn_frozen")
            assert values["stage2_backbone_lr_multiplier"] == (0.01 if row.endswith("_bn_frozen")
                                                               else 0.1)
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_lr_values"] == ["0.02", "0.002"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row == "main_held_out_stage2_loss_weights_2_1_0_1":
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_loss_weights"] == "2:1:0.1"
            assert values["stage2_lr_values"] == ["0.02", "0.002"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row == "main_held_out_stage2_warmup":
            # The recipe's stage II (precise BN included) at 10 epochs, its first at a tenth.
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_lr_values"] == ["0.002", "0.02", "0.002"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["1", "8"])
            continue
        if row == "main_held_out_stage2_head_lr_0_01":
            # Half the recipe's base rate with the trained blocks kept at the recipe's 0.002.
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_backbone_lr_multiplier"] == 0.2
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        # The recipe's stage II (lr 0.02, precise BN included) at 10 epochs with one change:
        # ending on the weights' average, fine-tuning the last 13 blocks, dropout before W, or
        # batches of 64 at twice the rate.
        changed = {"main_held_out_stage2_weight_average": {"stage2_weight_average_momentum": 0.998},
                   "main_held_out_stage2_13_blocks_lr_0_02": {
                       "stage2_backbone_trainable_blocks": 13,
                       "stage2_backbone_lr_multiplier": 0.1},
                   "main_held_out_stage2_dropout_0_5": {"dropout": 0.5},
                   "main_held_out_stage2_batch_64": {
                       "stage2_batch_size": 64, "stage2_lr_values": ["0.04", "0.004"]}}.get(row)
        if changed:
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            expected = {"stage2_backbone_trainable_blocks": 10, "dropout": 0.0, "batch_size": 32,
                        "stage2_batch_size": 32, "stage2_lr_values": ["0.02", "0.002"], **changed}
            for key, value in expected.items():
                assert values[key] == value, (name, key)
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row in ("main_held_out_stage2_recipe", "main_held_out_stage2_recipe_rerun"):
            # The recipe's stage II as it stands, validated with precise BN (every 4 epochs, the
            # rerun at its end only).
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_lr_values"] == ["0.02", "0.002"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (20, ["16"])
            assert values["stage2_weight_average_momentum"] is None
            continue
        # The recipe's stage II five epochs longer (its rate still dropping 4/5 of the way), and
        # at its length with its rate dropping after 12 epochs, not 16.
        schedule = {"main_held_out_stage2_25_epochs": (25, ["20"]),
                    "main_held_out_stage2_drop_after_12": (20, ["12"]),
                    "main_held_out_stage2_recipe_batch_64": (20, ["16"])}.get(row)
        if schedule:
            # ... and at its length and schedule on batches of 64 at twice the rate.
            batch_64 = row.endswith("_batch_64")
            assert values["stage"] == "2" and values["stage1_from"].endswith("/main_held_out")
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_batch_size"] == (64 if batch_64 else 32), name
            assert values["stage2_lr_values"] == (["0.04", "0.004"] if batch_64 else ["0.02", "0.002"])
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == schedule
            assert values["stage2_precise_bn"] is True
            continue
        if row in ("main_held_out_stage1_curve", "main_held_out_stage1_wide_text"):
            # Stage I alone, validated every 10 epochs; the probe differs in its text widths only.
            assert values["stage"] == "1" and values["stage1_epochs"] == 60
            assert values["validate_every_epochs"] == 10
            assert values["text_blocks"] == ["1", "1", "1", "1"]
            assert values["text_widths"] == (["256", "512", "1024", "2048"] if row.endswith("_wide_text")
                                             else ["128", "256", "512", "1024"]), name
            continue
        if row == "main_held_out_stage1_batch_64":
            # Stage I alone as main_held_out_stage1_curve, on batches of 64 at twice its rate.
            assert values["stage"] == "1" and values["stage1_epochs"] == 60
            assert values["validate_every_epochs"] == 10
            assert values["batch_size"] == 64 and values["stage1_lr_values"] == ["0.1", "0.01"]
            assert values["stage1_lr_boundaries"] == ["50"]
            assert values["text_widths"] == ["128", "256", "512", "1024"]
            continue
        if row in ("main_held_out_stage2_from_adam", "main_held_out_stage2_from_adam_lr_5e_4"):
            # The recipe's own stage II, on the original's SGD, from an Adam stage I.
            stage1_row = row.replace("_stage2_from_", "_stage1_")
            assert values["stage"] == "2" and values["stage1_from"].endswith(f"/{stage1_row}"), name
            assert values["stage2_backbone_trainable_blocks"] == 10 and values["stage2_batch_size"] == 64
            assert values["stage2_lr_values"] == ["0.04", "0.004"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (20, ["16"])
            assert values["stage2_precise_bn"] is True and values["stage2_optimizer"] == "matconvnet_sgd"
            continue
        if row in ("main_held_out_stage2_16_epochs", "main_held_out_stage2_12_epochs"):
            # The recipe's stage II from the recipe's held-out stage I, shorter, the lr down 10x
            # for its last quarter, validated at its end.
            epochs, boundary = {"main_held_out_stage2_16_epochs": (16, "12"),
                                "main_held_out_stage2_12_epochs": (12, "9")}[row]
            assert values["stage"] == "2"
            assert values["stage1_from"].endswith("/main_held_out_stage1_adam_lr_5e_4")
            assert values["stage2_backbone_trainable_blocks"] == 10 and values["stage2_batch_size"] == 64
            assert values["stage2_lr_values"] == ["0.04", "0.004"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (epochs, [boundary])
            assert values["validate_every_epochs"] == epochs
            assert values["stage2_precise_bn"] is True and values["stage2_optimizer"] == "matconvnet_sgd"
            continue
        if row in ("main_held_out_stage1_lr_0_1", "main_held_out_stage1_adam",
                   "main_held_out_stage1_adam_lr_5e_4", "main_held_out_stage1_adam_lr_1e_3"):
            # Stage I alone as main_held_out_stage1_curve, at another rate or optimizer only.
            assert values["stage"] == "1" and values["stage1_epochs"] == 60
            assert values["validate_every_epochs"] == 10 and values["batch_size"] == 32
            assert values["stage1_lr_boundaries"] == ["50"]
            assert values["text_widths"] == ["128", "256", "512", "1024"]
            assert values["stage1_optimizer"] == ("adam" if "_adam" in row else "matconvnet_sgd"), name
            assert values["stage1_lr_values"] == {
                "main_held_out_stage1_lr_0_1": ["0.1", "0.01"],
                "main_held_out_stage1_adam": ["2e-4", "2e-5"],
                "main_held_out_stage1_adam_lr_5e_4": ["5e-4", "5e-5"],
                "main_held_out_stage1_adam_lr_1e_3": ["1e-3", "1e-4"]}[row], name
            continue
        if row in ("main_held_out_bn_training_views", "main_held_out_bn_stage2_top"):
            assert values["stage"] == "both"
            assert values["backbone_bn_statistics"] == (
                "training_views" if row.endswith("_training_views") else "training_views_stage2_top")
            assert values["embedding_lr_multiplier"] == 0.001
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_lr_values"] == ["0.02", "0.002"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row == "main_held_out_embedding_lr_1":
            assert values["stage"] == "both" and values["embedding_lr_multiplier"] == 1.0
            assert values["stage2_backbone_trainable_blocks"] == 10
            assert values["stage2_lr_values"] == ["0.02", "0.002"]
            assert (values["stage2_epochs"], values["stage2_lr_boundaries"]) == (10, ["8"])
            continue
        if row == "main_stage2_hardest":
            assert values["stage"] == "2" and values["stage2_hardest_negative"] is True
            assert values["stage1_from"] == "workspace/experiments/flickr8k/main_stage2_batch_32"
            assert values["hardest_negative"] is False  # stage I's, from flickr8k.flags
            continue
        weights, share, shift, blocks = EXPECTED[row]
        assert values["stage"] == "1" and values["stage1_epochs"] == ABLATION_EPOCHS[dataset], name
        assert values["stage1_loss_weights"] == weights, name
        assert values["share_classifier"] is share and values["position_shift"] is shift, name
        # Validated on a split held out of train, reported on the test split (Flickr8k: dev).
        assert values["evaluate_test"] is True, name
        if blocks:
            assert values["text_blocks"] == blocks, name
        if row == "deep_text":
            assert values["text_widths"] == (["64", "128", "256", "512"] if dataset == "synthetic"
                                             else ["128", "256", "512", "1024"]), name
        if row == "random_word_init":
            assert values["word_embedding_init"] == "random"
        assert (values["classifier"], values["classifier_init"]) == EXPECTED_CLASSIFIER.get(
            row, ("cosine", "imprint")), name
        if row.endswith("_paper"):
            assert values["dropout"] == (0.75 if dataset == "flickr8k" else 0.5), name
        if dataset == "flickr8k":
            assert values["stage1_feature_views"] == 8


def test_flickr8k_ablations_train_on_shards_with_the_train_lists_tail_held_out():
    workspace = "workspace"
    for row in run_experiments.ROWS["flickr8k"].values():
        # Only the main recipe's rows report on shards with train whole, but for the two
        # that choose its stage II on the held-out tail.
        main_on_train = row.name.startswith("main") and not row.name.startswith("main_held_out")
        assert row.held_out is not main_on_train, row.name
        shards = run_experiments.row_shard_dir(row, workspace, "full_shards")
        suffix = "_glove" if row.word_vectors == run_experiments.GLOVE else ""
        assert shards == ("full_shards" if not row.held_out else os.path.join(
            "workspace", "flickr8k", "shards", "flickr8k_held_out")) + suffix
    assert not any(row.held_out for row in run_experiments.ROWS["synthetic"].values())


def test_held_out_split_lists_keep_the_order_and_take_the_tail(tmp_path):
    train_list = tmp_path / "trainImages.txt"
    names = [f"{index}_photo.jpg" for index in range(10)]
    train_list.write_text("\n".join(names) + "\n\n")
    train_part, held_out_part = run_experiments.write_held_out_split_lists(
        train_list, str(tmp_path / "lists"), 3)
    assert Path(train_part).read_text().split() == names[:7]
    assert Path(held_out_part).read_text().split() == names[7:]
    with pytest.raises(ValueError, match=f"{train_list}: 10 images, not enough to hold out 10"):
        run_experiments.write_held_out_split_lists(train_list, str(tmp_path / "other"), 10)
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(not shared_data.FLICKR8K_RAW.is_dir(), reason="no ../shared Flickr8k")
def test_flickr8k_held_out_split_is_the_last_500_of_the_standard_train_list(tmp_path):
    train_list, dev_list = shared_data.FLICKR8K_TRAIN_LIST, shared_data.FLICKR8K_DEV_LIST
    train_part, held_out_part = run_experiments.write_held_out_split_lists(
        train_list, str(tmp_path), run_experiments.FLICKR8K_HELD_OUT_IMAGES)
    train_names, held_out_names = Path(train_part).read_text().split(), Path(held_out_part).read_text().split()
    assert (len(train_names), len(held_out_names)) == (5500, 500)
    assert train_names + held_out_names == train_list.read_text().split()
    assert not set(held_out_names) & set(dev_list.read_text().split())


def test_flickr8k_without_shards_or_raw_data_says_how_to_build_them(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_data, "FLICKR8K_RAW", tmp_path / "no_shared")
    with pytest.raises(FileNotFoundError, match="README.md step 1"):
        run_experiments.ensure_shards("flickr8k", str(tmp_path / "shards"), str(tmp_path))
    assert not (tmp_path / "shards").exists()


@pytest.fixture(scope="module")
def tiny_shards(synthetic_shards) -> str:
    """The synthetic dataset (40 train, 12 val, 12 test images of 32x32) -> shards via data_prep."""
    return synthetic_shards("data", num_train=40, num_val=12, num_test=12, image_size=IMAGE_SIZE,
                            seed=0).shard_dir


def run_runner(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.run_experiments", *arguments],
                          cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.mark.subprocess
def test_runner_records_a_run_skips_it_after_and_stops_at_a_failing_row(tiny_shards, tmp_path):
    workspace, results_dir = tmp_path / "workspace", tmp_path / "runs"
    common = ["--dataset=synthetic", f"--workspace={workspace}", f"--shard_dir={tiny_shards}",
              f"--results_dir={results_dir}"]
    extra = " ".join(TINY_EXTRA_FLAGS)
    process = run_runner(*common, "--rows=ranking_only", f"--extra_flags={extra}")
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    record_file = results_dir / "synthetic-ranking_only.json"
    record = json.loads(record_file.read_text())
    run_dir = workspace / "experiments" / "synthetic" / "ranking_only"
    assert record["dataset"] == "synthetic" and record["row"] == "ranking_only"
    assert record["description"] == run_experiments.ROWS["synthetic"]["ranking_only"].description
    assert record["command"] == shlex.join([
        "python", "-m", "experiments.train",
        "--flagfile=experiments/configs/synthetic.flags",
        "--flagfile=experiments/configs/ablations/synthetic.flags",
        "--stage1_loss_weights=1:0:0", f"--shard_dir={tiny_shards}", f"--model_dir={run_dir}",
        *TINY_EXTRA_FLAGS])
    assert record["wall_seconds"] > 0 and record["finished"].endswith("+00:00")
    assert record["resumed"] is False
    assert record["machine"]["logical_cores"] == os.cpu_count() and record["machine"]["cpu"]
    assert record["results"] == json.loads((run_dir / "results.json").read_text())
    assert record["results"]["stage"] == 1
    for split in ("val", "test"):
        metrics = record["results"]["metrics"][split]
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
            assert 0 <= metrics[key] <= 100
        assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
    log = (run_dir / "train.log").read_text()
    assert "final retrieval results" in log and "final retrieval results" in process.stdout + process.stderr

    recorded = record_file.read_bytes()
    failed_dir = workspace / "experiments" / "synthetic" / "no_position_shift"
    (failed_dir / "stage1").mkdir(parents=True)
    (failed_dir / "run_command.txt").write_text("python -m experiments.train --an_older_command")
    process = run_runner(*common, "--rows=ranking_only,no_position_shift",
                         "--extra_flags=--no_such_flag=1")
    assert process.returncode != 0
    assert "[synthetic/ranking_only] skipped" in process.stdout
    failed_log = failed_dir / "train.log"
    assert not (failed_dir / "stage1").exists()  # left by another command: started afresh
    assert "row synthetic/no_position_shift failed with exit code" in process.stderr
    assert str(failed_log) in process.stderr
    assert "no_such_flag" in failed_log.read_text()
    assert record_file.read_bytes() == recorded
    assert sorted(path.name for path in results_dir.iterdir()) == ["synthetic-ranking_only.json"]
