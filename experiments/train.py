"""Trains the dual-path model: stage I, stage II or both (`dual-path-train`).

    dual-path-train --flagfile=experiments/configs/flickr30k.flags \\
        --shard_dir=workspace/flickr30k/shards/flickr30k --model_dir=workspace/flickr30k/runs/base

Run the same command again after an interruption: it resumes from the last checkpoint
and skips finished stages. The resolved flags are written to model_dir/flags.txt (a
flagfile), the resolved config tree to model_dir/config.json; TensorBoard logs to model_dir/logs.
"""
import logging as python_logging
import sys

from absl import app, flags, logging

from dual_path import config, run_layout, training
from experiments import commands, config_flags, tables
from experiments.retrieval_example import draw_retrieval_example

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags; called by run() only, so that importing this module
    defines no flags (see data_prep/build_shards.py). Every hyperparameter's flag comes from
    its declaration in dual_path/config.py (experiments/config_flags.py)."""
    flags.DEFINE_enum("stage", "both", ["1", "2", "both"], "Which stage(s) to train.")
    flags.DEFINE_enum("strategy", "default", list(training.STRATEGIES), "tf.distribute strategy.")
    flags.DEFINE_string("tpu", "", "TPU address or name, with --strategy=tpu.")
    config_flags.define_flags(FLAGS)


def stage_numbers() -> tuple[int, ...]:
    return config.STAGES if FLAGS.stage == "both" else (int(FLAGS.stage),)


class _WithoutTensorFlowInfo(python_logging.Filter):
    """Drops TensorFlow's own INFO lines (one per checkpoint saved) from the progress log."""

    def filter(self, record):
        return record.levelno >= python_logging.WARNING or "/tensorflow/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_WithoutTensorFlowInfo())
    try:
        train_config = config_flags.train_config(FLAGS, stage_numbers())
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    strategy = training.create_strategy(FLAGS.strategy, FLAGS.tpu)
    logging.info("strategy %s with %d replicas", FLAGS.strategy, strategy.num_replicas_in_sync)
    if training.is_chief(strategy):
        run_layout.write_run_flags(
            FLAGS.model_dir, commands.flagfile_text(FLAGS, sys.modules[__name__], config_flags))
    try:
        results = training.train(train_config, strategy, draw_retrieval_example)
    except training.NonFiniteLossError as error:
        logging.error("%s", error)
        sys.exit(f"training stopped: {error}")
    if results["metrics"]:
        print("\n".join(tables.recall_by_split_table(results["metrics"])), flush=True)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
