"""Times another benchmark with TensorFlow's oneDNN CPU kernels off and on (run by hand, not a test).

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported, and leaves oneDNN off by
default on CPUs without AVX-512 VNNI/BF16 or AMX (an AMD EPYC with AVX2 only, seen here), so
the two settings can only be compared in two processes. This script runs
`python -m experiments.benchmarks.<--benchmark>` with the arguments after `--`, once with
TF_ENABLE_ONEDNN_OPTS=0 (the baseline) and once with =1, one after the other on this machine,
each writing its own JSON report, and prints every figure of both next to each other with
on / off. experiments.commands.run_command, which runs the training commands of dual-path-demo
and run_experiments, sets it to 1 unless the environment says otherwise.

    python -m experiments.benchmarks.onednn --benchmark=backbone_finetune \\
        --output_json=experiments/results/benchmarks/onednn_backbone_finetune.json -- --steps=5
    python -m experiments.benchmarks.onednn --benchmark=train_step -- \\
        --shard_dir=workspace/flickr8k/shards/flickr8k_glove

The report's figures are the other benchmark's, each named <figure>_onednn_off and
<figure>_onednn_on; its ratios <figure>_on_over_off.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from experiments.benchmarks import report

BENCHMARKS = ("backbone_finetune", "train_step")
"""The training-speed benchmarks (every figure a speed: higher is faster)."""
SETTINGS = ("0", "1")
"""TF_ENABLE_ONEDNN_OPTS off (the baseline), then on."""


def _parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this script's arguments, the other benchmark's: everything after `--`)."""
    split = argv.index("--") if "--" in argv else len(argv)
    own, passed = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS,
                        help="the benchmark of experiments/benchmarks to run twice")
    report.add_output_argument(parser)
    args = parser.parse_args(own)
    if any(part.startswith("--output_json") for part in passed):
        parser.error("--output_json after -- : each run's report is this script's to place")
    return args, passed


def run_with_onednn(benchmark: str, arguments: list[str], setting: str, output_json: str) -> dict:
    """The report of `benchmark` run in a process of its own with TF_ENABLE_ONEDNN_OPTS=setting.

    Raises:
      RuntimeError: the run failed (its exit code and the end of its output).
    """
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting, "TF_CPP_MIN_LOG_LEVEL": "1"}
    process = subprocess.run(
        [sys.executable, "-m", f"experiments.benchmarks.{benchmark}", *arguments,
         f"--output_json={output_json}"], env=environment, capture_output=True, text=True)
    if process.returncode:
        raise RuntimeError(f"{benchmark} with TF_ENABLE_ONEDNN_OPTS={setting} exited with "
                           f"{process.returncode}:\n{(process.stdout + process.stderr)[-3000:]}")
    with open(output_json, encoding="utf-8") as file:
        return json.load(file)


def main() -> None:
    args, passed = _parse_args(sys.argv[1:])
    with tempfile.TemporaryDirectory() as folder:
        reports = {setting: run_with_onednn(args.benchmark, passed, setting,
                                            os.path.join(folder, f"onednn_{setting}.json"))
                   for setting in SETTINGS}
    off, on = reports["0"]["figures"], reports["1"]["figures"]
    figures, ratios = {}, {}
    for name in off:
        figures[f"{name}_onednn_off"], figures[f"{name}_onednn_on"] = off[name], on[name]
        ratios[f"{name}_on_over_off"] = on[name] / off[name]

    print(f"{args.benchmark} with TensorFlow's oneDNN kernels off and on (TF_ENABLE_ONEDNN_OPTS), "
          f"on {report.describe(reports['0']['machine'])}")
    print(f"{'':<50}{'off':>10}{'on':>10}  on/off")
    for name in off:
        print(f"{name:<50}{off[name]:>10.1f}{on[name]:>10.1f}  {ratios[f'{name}_on_over_off']:.2f}")
    if args.output_json:
        # The runs' own reports lie in a folder that is gone: their path is left out.
        off_settings = {name: value for name, value in reports["0"]["settings"].items()
                        if name != "output_json"}
        settings = {"benchmark": args.benchmark, "arguments": passed,
                    "settings_onednn_off": off_settings}
        report.write_report(args.output_json, "onednn", figures, ratios, settings)


if __name__ == "__main__":
    main()
