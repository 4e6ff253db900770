"""Writes the embedded synthetic image-caption dataset (see `data_prep.synthetic`).

    dual-path-generate-synthetic --output_dir=/tmp/synthetic

gives /tmp/synthetic/images/*.jpg and /tmp/synthetic/dataset_synthetic.json
(Karpathy format), ready for the Karpathy reader with image_root=/tmp/synthetic.
"""
import time

from absl import app, flags, logging

from data_prep import synthetic

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command's flags; called by run() only (see data_prep/build_shards.py)."""
    flags.DEFINE_string("output_dir", None, "Where images/ and the dataset JSON go.", required=True)
    flags.DEFINE_integer("num_train", 8000, "Training images.")
    flags.DEFINE_integer("num_val", 1000, "Validation images (unique descriptions).")
    flags.DEFINE_integer("num_test", 1000, "Test images (unique descriptions).")
    flags.DEFINE_integer("image_size", 64, "Image height and width in pixels.")
    flags.DEFINE_integer("seed", 0, "Same seed, same bytes.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.monotonic()
    json_path = synthetic.generate(
        FLAGS.output_dir,
        num_train=FLAGS.num_train,
        num_val=FLAGS.num_val,
        num_test=FLAGS.num_test,
        image_size=FLAGS.image_size,
        seed=FLAGS.seed,
    )
    logging.info("wrote %s in %.1f s", json_path, time.monotonic() - start)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
