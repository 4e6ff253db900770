"""../shared's paths and the Flickr8k recipe (data_prep/shared_data.py): one place, which the
README's build command, the benchmarks and run_experiments all follow."""
import re

import pytest

from data_prep import readers, shared_data


def readme_build_command() -> str:
    """The README's step-1 command (dual-path-build-shards ... up to its last continued line)."""
    readme = (shared_data.REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^dual-path-build-shards (?:.*\\\n)*.*$", readme, re.M)
    return " ".join(match.group(0).replace("\\\n", " ").split())


def test_the_readme_builds_the_flickr8k_shards_with_the_recipe():
    assert readme_build_command() == shared_data.flickr8k_build_command(
        "workspace/flickr8k/shards/flickr8k_glove")


def test_paths_are_shown_relative_to_the_repository_or_shared():
    assert shared_data.shown(shared_data.GLOVE_50D) == "../shared/vectors/glove.6B.50d.top100k.txt"
    assert shared_data.shown(f"train={shared_data.FLICKR8K_TRAIN_LIST},x={shared_data.REPO}/w") == (
        "train=../shared/data/flickr8k/Flickr8k_text/Flickr_8k.trainImages.txt,x=w")
    assert shared_data.flickr8k_split_files("a", "b", test="c") == "train=a,dev=b,test=c"


@pytest.mark.skipif(not shared_data.FLICKR8K_RAW.is_dir(), reason="../shared's Flickr8k is absent")
def test_the_recipe_reads_the_shared_flickr8k_train_and_dev_splits():
    for path in (shared_data.FLICKR8K_CAPTIONS, shared_data.FLICKR8K_TRAIN_LIST,
                 shared_data.FLICKR8K_DEV_LIST, shared_data.GLOVE_50D,
                 shared_data.MOBILENET_0_25_WEIGHTS, shared_data.MOBILENET_V2_WEIGHTS):
        assert path.is_file(), path
    source = readers.read_source(shared_data.FLICKR8K_SOURCE_FORMAT, **shared_data.flickr8k_source())
    splits = [record.split for record in source.records]
    assert (splits.count("train"), splits.count("val")) == (6000, 1000)  # dev is read as val
