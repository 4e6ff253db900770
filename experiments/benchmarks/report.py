"""The machine a benchmark ran on, its figures as one JSON report, and the flags benchmarks share.

Benchmarks that read a raw dataset take its flags from `add_raw_dataset_arguments`
(default: ../shared's Flickr8k). Every benchmark takes `--output_json=PATH` (see
`add_output_argument`); with it, the script writes (atomically, `dual_path.atomic_write`)

  {"benchmark": "train_step",
   "machine":  {"cpu", "logical_cores", "memory_gib", "tensorflow", "keras", "gpus"},
   "settings": {flag: value, ...},
   "figures":  {"dual_path_examples_per_s": 41.2, ...},     flat, units in the names
   "ratios":   {"dual_path_over_image_only": 0.31, ...},    each a ratio of two figures
   "date":     "2025-01-31T12:00:00+00:00"}                 UTC, when the report was written

that a separate script gathers into experiments/RESULTS.md.
"""
import argparse
import datetime
import json
import math
import os
import platform
from typing import Sequence

import keras
import tensorflow as tf

from data_prep import readers, shared_data
from dual_path.atomic_write import write_atomically

_CPUINFO = "/proc/cpuinfo"
_MEMINFO = "/proc/meminfo"


def add_raw_dataset_arguments(parser: argparse.ArgumentParser, splits: Sequence[str]) -> None:
    """--source_format, --captions, --image_root, --split_files: the raw dataset a benchmark reads
    (`data_prep.readers.read_source`'s arguments); default ../shared's Flickr8k in flickr_tokens
    format, with the split lists of splits (Flickr8k's names: "train", "dev", "test")."""
    lists = {"train": shared_data.FLICKR8K_TRAIN_LIST, "dev": shared_data.FLICKR8K_DEV_LIST}
    parser.add_argument("--source_format", default=shared_data.FLICKR8K_SOURCE_FORMAT,
                        choices=sorted(readers.FORMATS))
    parser.add_argument("--captions", default=str(shared_data.FLICKR8K_CAPTIONS),
                        help="caption file(s) of the raw dataset")
    parser.add_argument("--image_root", default=str(shared_data.FLICKR8K_IMAGES),
                        help="image folder of the raw dataset")
    parser.add_argument("--split_files",
                        default=",".join(f"{split}={lists[split]}" for split in splits),
                        help="split lists (flickr_tokens, coco); '' for formats that carry their splits")


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """--output_json: where to write the report; default none (print only)."""
    parser.add_argument("--output_json",
                        help="also write the figures as a JSON report here "
                             "(e.g. experiments/results/benchmarks/<name>.json); default: print only")


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    if os.path.exists(_CPUINFO):
        with open(_CPUINFO, encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    """Total physical memory in GiB (2**30 bytes), or None where it cannot be read."""
    if os.path.exists(_MEMINFO):
        with open(_MEMINFO, encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / 2**30, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict]:
    """The GPUs TensorFlow sees: [{"name": "/physical_device:GPU:0", "model": "..."}]."""
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        gpus.append({"name": device.name, "model": details.get("device_name", "")})
    return gpus


def machine() -> dict:
    """{"cpu": model name, "logical_cores": int, "memory_gib": float | None,
    "tensorflow": version, "keras": version, "gpus": [{"name", "model"}, ...]}."""
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": _gpus(),
    }


def describe(machine_info: dict) -> str:
    """One line for a benchmark's printout: the GPUs (else the CPU), cores, TensorFlow version."""
    device = ", ".join(gpu["model"] or gpu["name"] for gpu in machine_info["gpus"]) or f"{machine_info['cpu']} (CPU)"
    return f"{device}, {machine_info['logical_cores']} logical cores, TensorFlow {machine_info['tensorflow']}"


def portable_settings(value):
    """value with every absolute path of this checkout written as the repository sees it:
    ../shared/... for the shared folder, relative to the repository root inside it. Strings
    are rewritten wherever the paths occur in them (lists like "train=PATH,dev=PATH" too);
    lists and dicts recursively; anything else as it is."""
    if isinstance(value, str):
        return shared_data.shown(value)
    if isinstance(value, list):
        return [portable_settings(item) for item in value]
    if isinstance(value, dict):
        return {key: portable_settings(item) for key, item in value.items()}
    return value


def _check_flat_numbers(kind: str, values: dict) -> None:
    for name, value in values.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"{kind} must map names to finite numbers, got {name!r}: {value!r}")


def write_report(path: str, benchmark: str, figures: dict, ratios: dict, settings: dict) -> None:
    """Writes the JSON report (format in the module docstring) to path, atomically.

    Args:
      path: the JSON file; its folder is created if needed.
      benchmark: the script's name, e.g. "train_step".
      figures: {name with its unit: number}, e.g. {"dual_path_examples_per_s": 41.2}.
      ratios: {name: figure / figure}, e.g. {"dual_path_over_image_only": 0.31}.
      settings: the run's settings (flag values), JSON-serialisable; written with
        `portable_settings`, so that no path of this machine is committed.
    Raises:
      ValueError: a figure or ratio is not a finite number.
    """
    _check_flat_numbers("figures", figures)
    _check_flat_numbers("ratios", ratios)
    report = {
        "benchmark": benchmark,
        "machine": machine(),
        "settings": portable_settings(settings),
        "figures": figures,
        "ratios": ratios,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    write_atomically(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    print(f"report written to {path}")
