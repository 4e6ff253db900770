"""Commands: running the project's own from an application (dual-path-demo,
run_experiments), the output streamed to the console and, where asked, to a log file; and
what a command records of its own flags (flags.txt, an evaluation's JSON).
"""
import os
import subprocess
import sys
import time
from typing import Sequence

from absl import flags


def run_command(command: Sequence[str], *, log_path: str | None = None, append: bool = False,
                cwd: str | None = None) -> tuple[int, float]:
    """Runs command (in cwd), its stdout and stderr printed as they come and written to
    log_path (appended with append). TensorFlow's C++ INFO lines (oneDNN, CPU features) are
    turned off: they say nothing about the run. TensorFlow's oneDNN CPU kernels are turned on
    (TF_ENABLE_ONEDNN_OPTS=1), which TensorFlow leaves off on CPUs without AVX-512 VNNI/BF16
    or AMX, where they train 1.2-1.8x faster (experiments/benchmarks/onednn.py); the
    environment's own value of either wins. Returns (exit code, wall-clock seconds)."""
    environment = {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "1", **os.environ}
    start = time.monotonic()
    log = open(log_path, "a" if append else "w", encoding="utf-8") if log_path else None
    try:
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if log:
                log.write(line)
        returncode = process.wait()
    finally:
        if log:
            log.close()
    return returncode, time.monotonic() - start


def command_flags(flag_values: flags.FlagValues, *modules) -> list[flags.Flag]:
    """The flags the given modules defined (a command's own), sorted by name."""
    defined = [flag for module in modules for flag in flag_values.get_flags_for_module(module)]
    return sorted(defined, key=lambda flag: flag.name)


def flag_values_dict(flag_values: flags.FlagValues, *modules) -> dict:
    """{name: value} of the modules' flags (what a command records of how it ran)."""
    return {flag.name: flag.value for flag in command_flags(flag_values, *modules)}


def flagfile_text(flag_values: flags.FlagValues, *modules) -> str:
    """The modules' flags that have a value as flagfile lines (rerun with --flagfile)."""
    return "".join(flag.serialize() + "\n" for flag in command_flags(flag_values, *modules)
                   if flag.value is not None)
