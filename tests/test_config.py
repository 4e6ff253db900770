"""The config tree (dual_path/config.py) and the flags derived from it
(experiments/config_flags.py): each setting declared once, every flagfile resolving through it."""
import dataclasses
import json
from pathlib import Path

import pytest
from absl import flags

from dual_path import config
from experiments import config_flags

REPO = Path(__file__).resolve().parents[1]
MANIFEST = {"vocab_size": 120, "num_classes": 40, "max_length": 32, "embedding": {"dim": 50}}


def parsed(*argv: str) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    config_flags.define_flags(flag_values)
    flag_values(["train", "--model_dir=run", "--shard_dir=shards", *argv])
    return flag_values


def test_every_setting_is_one_flag_named_after_its_field_and_nothing_else_is():
    flag_values = flags.FlagValues()
    config_flags.define_flags(flag_values)
    expected = set()
    for cls in (config.TrainConfig, config.DualPathConfig):
        expected |= {field.name for field in dataclasses.fields(cls)
                     if "help" in field.metadata and not field.metadata.get("from_shards")}
    for field in dataclasses.fields(config.StageConfig):
        expected |= {f"stage{number}_{field.name}" for number in field.metadata.get("per_stage", {})}
    assert set(flag_values) == expected
    # The fields with no flag: the tree's branches, what the shards decide, the stage number.
    assert "model" not in flag_values and "vocab_size" not in flag_values
    assert "stage1_backbone_lr_multiplier" not in flag_values  # stage I keeps 1.0
    assert flag_values["stage2_backbone_lr_multiplier"].default == 0.02
    assert flag_values["stage1_loss_weights"].default == "0:1:1"
    assert flag_values["stage2_lr_boundaries"].default == ["40"]


def test_the_flags_defaults_are_the_fields_defaults():
    flag_values = parsed()
    model = config_flags.model_config(flag_values, MANIFEST)
    assert model == config.DualPathConfig(vocab_size=120, num_classes=40, max_length=32,
                                          embedding_dim=50)
    for number in config.STAGES:
        assert config_flags.stage_config(flag_values, number) == config.stage_defaults(number)


def test_flickr8k_flagfile_resolves_to_its_recipe():
    flag_values = parsed(f"--flagfile={REPO / 'experiments/configs/flickr8k.flags'}")
    model = config_flags.model_config(flag_values, MANIFEST)
    assert (model.backbone, model.alpha, model.text_blocks, model.head_dims) == (
        "MobileNetV2", 1.0, (1, 1, 1, 1), (1024, 1024))
    assert model.weights == "../shared/weights/mobilenet_v2_1.0_224_no_top.weights.h5"
    stage1, stage2 = (config_flags.stage_config(flag_values, number) for number in config.STAGES)
    # Stage I on Adam at 5e-4, stage II on the original's SGD.
    assert (stage1.epochs, stage1.lr_values, stage1.lr_boundaries, stage1.feature_views) == (
        60, (5e-4, 5e-5), (50.0,), 8)
    assert (stage1.optimizer, stage2.optimizer) == ("adam", "matconvnet_sgd")
    assert stage1.loss_weights == config.LossWeights(1, 1, 1) and not stage1.train_backbone
    assert (stage2.train_backbone, stage2.backbone_lr_multiplier, stage2.backbone_trainable_blocks) == (
        True, 0.1, 10)
    # Stage II on batches of 64 at twice the rate; stage I keeps the run's 32.
    assert (stage1.batch_size, stage2.batch_size, stage2.lr_values) == (None, 64, (0.04, 0.004))
    assert (stage2.epochs, stage2.lr_boundaries) == (16, (12.0,))
    run = config.TrainConfig(model_dir="run", shard_dir="shards", model=model, stages=(stage1, stage2),
                             batch_size=flag_values.batch_size)
    assert [run.stage_batch_size(stage) for stage in run.stages] == [32, 64]


def test_none_unsets_an_optional_number_and_bad_values_name_their_flag():
    assert parsed("--alpha=0.5", "--alpha=none").alpha is None
    assert parsed("--stage2_backbone_trainable_blocks=none").stage2_backbone_trainable_blocks is None
    with pytest.raises(flags.IllegalFlagValueError, match="stage2_backbone_trainable_blocks"):
        parsed("--stage2_backbone_trainable_blocks=-1")
    with pytest.raises(flags.IllegalFlagValueError, match="stage2_batch_size"):
        parsed("--stage2_batch_size=0")
    with pytest.raises(config_flags.ConfigFlagError, match="--head_dims=8,x"):
        config_flags.model_config(parsed("--head_dims=8,x"), MANIFEST)
    with pytest.raises(config_flags.ConfigFlagError, match="--stage1_loss_weights: loss weights"):
        config_flags.stage_config(parsed("--stage1_loss_weights=1:2"), 1)
    with pytest.raises(config_flags.ConfigFlagError, match="--embedding_dim=300, but the shards"):
        config_flags.model_config(parsed("--embedding_dim=300"), MANIFEST)
    assert config_flags.model_config(parsed("--weights=none"), MANIFEST).weights is None
    assert config_flags.stage_config(parsed("--stage2_weight_average_momentum=0.998"),
                                     2).weight_average_momentum == 0.998


def test_the_tree_round_trips_through_json_and_unknown_keys_are_named():
    tree = config.TrainConfig(
        model_dir="run", shard_dir="shards",
        model=config.DualPathConfig(vocab_size=10, num_classes=3, head_dims=(8, 8), alpha=0.5),
        stages=(config.stage_defaults(1), dataclasses.replace(config.stage_defaults(2),
                                                               backbone_trainable_blocks=2)),
        margin=0.2)
    values = json.loads(json.dumps(config.to_dict(tree)))
    assert values["stages"][0]["loss_weights"] == {"rank": 0.0, "image": 1.0, "text": 1.0}
    assert config.from_dict(config.TrainConfig, values) == tree
    values["model"]["no_such_field"] = 1
    with pytest.raises(ValueError, match="not fields of DualPathConfig: no_such_field"):
        config.from_dict(config.TrainConfig, values)


def test_loss_weights_print_as_they_parse():
    for text in ("0:1:1", "2:1:0.1", "1:0.5:0"):
        assert str(config.LossWeights.parse(text)) == text
