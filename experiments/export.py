"""Exports a trained run as a SavedModel of embedding signatures (`dual-path-export`).

    dual-path-export --model_dir=workspace/flickr30k/runs/base

writes model_dir/export/<next version>/ (saved_model.pb, variables/, assets/vocab.txt,
export_info.json) and prints where. dual_path/export.py describes the signatures.

Defaults come from the run's model_dir/flags.json (written by dual-path-train): --shard_dir
from its shard_dir, --flip_images and --shift_texts from its eval_flip_images and
eval_shift_texts (the dataset's evaluation settings: no flip where captions say left/right).
Without flags.json, --shard_dir is required and flip/shift take the trainer's defaults.
"""
import dataclasses
import sys

from absl import app, flags, logging

from dual_path import export, run_layout, training

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags; called by run() only (see data_prep/build_shards.py)."""
    flags.DEFINE_string("model_dir", None, "The trained run to export.")
    flags.DEFINE_string("shard_dir", None,
                        "Shards whose vocab.txt and manifest.json (oov, max_length) the model was "
                        "trained with; default: shard_dir of model_dir/flags.json.")
    flags.DEFINE_enum("checkpoint", "best", list(run_layout.CHECKPOINT_CHOICES),
                      "The last finished stage's best-by-validation or last checkpoint.")
    flags.DEFINE_string("export_dir", None,
                        "Folder to create; default model_dir/export/<next version number>.")
    flags.DEFINE_bool("flip_images", None,
                      "Add the mirrored image's embedding; default: the run's eval_flip_images.")
    flags.DEFINE_bool("shift_texts", None,
                      "Sum a sentence's embeddings over its positions; default: the run's "
                      "eval_shift_texts.")
    flags.mark_flag_as_required("model_dir")




def _setting(name: str, run_flags: dict, run_flag: str):
    """The flag's value if given, else the run's flags.json value, else the trainer's default."""
    if FLAGS[name].value is not None:
        return FLAGS[name].value
    if run_flag in run_flags:
        logging.info("--%s=%s from the run's %s", name, run_flags[run_flag], run_layout.RUN_FLAGS_NAME)
        return bool(run_flags[run_flag])
    default = next(field.default for field in dataclasses.fields(training.TrainConfig)
                   if field.name == run_flag)
    logging.warning("--%s not given and no %s in the run's %s: using the trainer's default %s",
                    name, run_flag, run_layout.RUN_FLAGS_NAME, default)
    return default


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run_flags = run_layout.read_run_flags(FLAGS.model_dir)
    except ValueError as error:
        sys.exit(f"export failed: {error}")
    shard_dir = FLAGS.shard_dir or run_flags.get("shard_dir")
    if not shard_dir:
        raise app.UsageError(f"--shard_dir is required: {FLAGS.model_dir} has no "
                             f"{run_layout.RUN_FLAGS_NAME} naming the run's shard_dir")
    try:
        result = export.export_run(
            FLAGS.model_dir, shard_dir=shard_dir, checkpoint=FLAGS.checkpoint,
            export_dir=FLAGS.export_dir,
            flip_images=_setting("flip_images", run_flags, "eval_flip_images"),
            shift_texts=_setting("shift_texts", run_flags, "eval_shift_texts"))
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        sys.exit(f"export failed: {error}")
    print(f"SavedModel written to {result.export_dir} (from {result.info['checkpoint']})")
    print(f"export info written to {result.info_path}", flush=True)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
