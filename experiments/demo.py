"""The main job on the embedded dataset: generate it, build its shards, train both stages.

Runs the project's own commands one after another, printing each so that it can be rerun by
hand, in the workspace layout of WORKSPACE.md:

  dual-path-demo --workspace=workspace/synthetic [-- extra dual-path-train flags]

Each step skips what an earlier run already finished (the generator's JSON, complete shards,
finished training stages), so an interrupted demo continues where it stopped. The trainer
prints validation and test R@1/5/10 at the end and writes them to runs/synthetic/results.json.
"""
import os
import shlex
import sys

from absl import app
from absl import flags

from data_prep import synthetic
from experiments import commands

FLAGS = flags.FLAGS

DATASET = "synthetic"
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{DATASET}.flags")


def define_flags() -> None:
    """Defines the command's flags; called by run() only (see data_prep/build_shards.py)."""
    flags.DEFINE_string("workspace", "workspace/synthetic", "Folder for everything the run writes.")
    flags.DEFINE_integer("num_workers", None, "Shard-writing processes; default: one per CPU.")


def _run(command: list[str]) -> None:
    print("\n$ " + shlex.join(command), flush=True)
    returncode, _ = commands.run_command(command)
    if returncode != 0:
        sys.exit(f"dual-path-demo: step failed with exit code {returncode}: {command[2]}")


def main(argv: list[str]) -> None:
    workspace = os.path.abspath(FLAGS.workspace)
    raw_dir = os.path.join(workspace, "raw", DATASET)
    shard_dir = os.path.join(workspace, "shards", DATASET)
    model_dir = os.path.join(workspace, "runs", DATASET)
    dataset_json = os.path.join(raw_dir, f"dataset_{DATASET}.json")
    python = sys.executable

    if not os.path.exists(dataset_json):
        _run([python, "-m", "data_prep.generate_synthetic", f"--output_dir={raw_dir}"])
    build = [
        python, "-m", "data_prep.build_shards",
        "--source_format=karpathy",
        f"--captions={dataset_json}",
        f"--shard_dir={shard_dir}",
        f"--num_image_shards={synthetic.IMAGE_SHARDS}",
        f"--num_caption_shards={synthetic.CAPTION_SHARDS}",
    ]
    if FLAGS.num_workers:
        build.append(f"--num_workers={FLAGS.num_workers}")
    _run(build)
    _run([
        python, "-m", "experiments.train",
        f"--flagfile={CONFIG}",
        f"--shard_dir={shard_dir}",
        f"--model_dir={model_dir}",
        *argv[1:],
    ])
    print(f"\nResults: {os.path.join(model_dir, 'results.json')}\n"
          f"TensorBoard: tensorboard --logdir={os.path.join(model_dir, 'logs')}")


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
