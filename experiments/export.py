"""Exports a trained run as a SavedModel of embedding signatures (`dual-path-export`).

    dual-path-export --model_dir=workspace/flickr30k/runs/base

writes model_dir/export/<next version>/ (saved_model.pb, variables/, assets/vocab.txt,
export_info.json) and prints where. dual_path/export.py describes the signatures.

Defaults come from the run's config tree, model_dir/config.json (`run_layout.load_run_config`):
--shard_dir from its shard_dir, --flip_images and --shift_texts from its eval_flip_images and
eval_shift_texts (the dataset's evaluation settings: no flip where captions say left/right).
"""
import sys

from absl import app, flags

from dual_path import export, run_layout

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags; called by run() only (see data_prep/build_shards.py)."""
    flags.DEFINE_string("model_dir", None, "The trained run to export.")
    flags.DEFINE_string("shard_dir", None,
                        "Shards whose vocab.txt and manifest.json (oov, max_length) the model was "
                        "trained with; default: the run's (model_dir/config.json).")
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




def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run_config = run_layout.load_run_config(FLAGS.model_dir)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"export failed: {error}")
    try:
        result = export.export_run(
            FLAGS.model_dir, shard_dir=FLAGS.shard_dir or run_config.shard_dir,
            checkpoint=FLAGS.checkpoint, export_dir=FLAGS.export_dir,
            flip_images=_flag_or(FLAGS.flip_images, run_config.eval_flip_images),
            shift_texts=_flag_or(FLAGS.shift_texts, run_config.eval_shift_texts))
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        sys.exit(f"export failed: {error}")
    print(f"SavedModel written to {result.export_dir} (from {result.info['checkpoint']})")
    print(f"export info written to {result.info_path}", flush=True)


def _flag_or(flag_value, run_value):
    """The flag's value where it was given, else the run's."""
    return run_value if flag_value is None else flag_value


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
