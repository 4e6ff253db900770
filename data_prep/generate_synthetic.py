"""Writes the embedded synthetic image-caption dataset (see `data_prep.synthetic`).

    dual-path-generate-synthetic --output_dir=/tmp/synthetic

gives /tmp/synthetic/images/*.jpg and /tmp/synthetic/dataset_synthetic.json
(Karpathy format), ready for the Karpathy reader with image_root=/tmp/synthetic.
"""
import time

from absl import app, flags, logging

from data_prep import synthetic

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where images/ and the dataset JSON go.", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 8000, "Training images.")
_NUM_VAL = flags.DEFINE_integer("num_val", 1000, "Validation images (unique descriptions).")
_NUM_TEST = flags.DEFINE_integer("num_test", 1000, "Test images (unique descriptions).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image height and width in pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed, same bytes.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.monotonic()
    json_path = synthetic.generate(
        _OUTPUT_DIR.value,
        num_train=_NUM_TRAIN.value,
        num_val=_NUM_VAL.value,
        num_test=_NUM_TEST.value,
        image_size=_IMAGE_SIZE.value,
        seed=_SEED.value,
    )
    logging.info("wrote %s in %.1f s", json_path, time.monotonic() - start)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
