"""The data in ../shared, next to the repository (read-only; CI has it at the same place):
its files' paths, and the Flickr8k shards' build recipe. Everything that reads ../shared
names it through this module; tests and benchmarks skip or fall back when it is absent.

  data/flickr8k/                 Flickr8k in its original layout (train 6,000 + dev 1,000
                                 images, 224x224 JPEG; 5 captions each); no test split
  vectors/glove.6B.50d.top100k.txt  GloVe 6B 50-d, the 100,000 most frequent words
  weights/                       ImageNet weights of MobileNet v1 0.25 and MobileNetV2 1.0
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FLICKR8K_RAW = SHARED / "data" / "flickr8k"
FLICKR8K_TEXT = FLICKR8K_RAW / "Flickr8k_text"
FLICKR8K_CAPTIONS = FLICKR8K_TEXT / "Flickr8k.token.txt"
FLICKR8K_IMAGES = FLICKR8K_RAW / "Flicker8k_Dataset"
FLICKR8K_TRAIN_LIST = FLICKR8K_TEXT / "Flickr_8k.trainImages.txt"
FLICKR8K_DEV_LIST = FLICKR8K_TEXT / "Flickr_8k.devImages.txt"
GLOVE_50D = SHARED / "vectors" / "glove.6B.50d.top100k.txt"
MOBILENET_0_25_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
MOBILENET_V2_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.weights.h5"
FLICKR8K_SOURCE_FORMAT = "flickr_tokens"


def shown(path: Path | str) -> str:
    """A path as the docs and records write it: ../shared/... or relative to the repository."""
    text = str(path)
    return text.replace(f"{SHARED}/", "../shared/").replace(f"{REPO}/", "")


def flickr8k_split_files(train: Path | str = FLICKR8K_TRAIN_LIST, dev: Path | str = FLICKR8K_DEV_LIST,
                         test: Path | str | None = None) -> str:
    """build_shards' --split_files of the Flickr8k shards: "train=...,dev=...[,test=...]"."""
    parts = [f"train={train}", f"dev={dev}"] + ([f"test={test}"] if test else [])
    return ",".join(parts)


def flickr8k_source(split_files: str | None = None) -> dict:
    """`data_prep.readers.read_source` arguments of ../shared's Flickr8k (the standard train
    and dev lists unless split_files says otherwise)."""
    return {"captions": str(FLICKR8K_CAPTIONS), "image_root": str(FLICKR8K_IMAGES),
            "split_files": split_files or flickr8k_split_files()}


def flickr8k_build_command(shard_dir: str, word2vec: Path | str = GLOVE_50D) -> str:
    """The dual-path-build-shards command of the Flickr8k shards (README's step 1), as the
    docs write it."""
    source = flickr8k_source()
    return shown(" ".join([
        "dual-path-build-shards", f"--source_format={FLICKR8K_SOURCE_FORMAT}",
        f"--captions={source['captions']}", f"--image_root={source['image_root']}",
        f"--split_files={source['split_files']}", f"--word2vec={word2vec}", f"--shard_dir={shard_dir}"]))
