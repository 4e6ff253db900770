"""Generates experiments/RESULTS.md from the run records and benchmark reports.

    python -m experiments.write_results            (writes experiments/RESULTS.md)
    python -m experiments.write_results --check    (exits 1 if RESULTS.md is not what the JSON gives)

Inputs, under --results_dir (default experiments/results):
  runs/<dataset>-<row>.json     records of experiments/run_experiments.py (format in its docstring)
  benchmarks/<name>.json        reports of experiments/benchmarks (format in
                                experiments/benchmarks/report.py)

The page has a Flickr8k section (the main run on the dev split next to published figures),
one ablation table per dataset (under the comment of its ablation flagfile, which says what the
rows share) and one section per benchmark report; whatever has no JSON yet says "not run yet".
The output depends on the JSON and those flagfile comments only: rows in table order, files
sorted by name, fixed number formats.
"""
import glob
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from absl import app, flags

from dual_path import evaluation
from dual_path.atomic_write import write_atomically
from experiments import run_experiments, tables

FLAGS = flags.FLAGS

REPO = Path(__file__).resolve().parents[1]

DEFAULT_RESULTS_DIR = "experiments/results"
DEFAULT_OUTPUT = "experiments/RESULTS.md"
REGENERATE = "python -m experiments.write_results"
RUNS_DIR = "runs"
BENCHMARKS_DIR = "benchmarks"
MAIN_ROW = "main"
FLICKR8K_SPLIT = "val"  # the shared copy's dev split, built as "val": there is no test split

# Published Flickr8k results on the 1K test split with ImageNet CNN features, as listed in
# ../shared/README.md: method -> (image->text R@1, text->image R@1), percent. From DeViSE
# (Frome et al., NIPS 2013), Deep Fragment Embeddings (Karpathy et al., NIPS 2014), BRNN
# (Karpathy and Fei-Fei, CVPR 2015) and m-CNN (Ma et al., ICCV 2015).
PUBLISHED_FLICKR8K_R1 = {
    "DeViSE": (4.5, 6.7),
    "Deep Fragment Embeddings": (12.6, 9.7),
    "BRNN": (16.5, 11.8),
    "m-CNN": (24.8, 20.3),
}
PUBLISHED_SOURCE = "../shared/README.md (Flickr8k 1K test split, ImageNet CNN features)"

NOT_RUN = "not run yet"

# What each ablation table is run to check: (row, baseline row, least rsum ratio, claim). The
# first two are the paper's, at the project's targets; the third compares this implementation's
# instance classifier with the paper's.
CLAIMS = (
    ("instance_only", "ranking_only", 1.0,
     "the instance loss alone learns retrieval at least as well as the ranking loss alone"),
    ("both", "ranking_only", 1.1, "the instance loss adds to the ranking loss (at least 1.1x)"),
    ("instance_only", "instance_only_paper", 1.0,
     "the imprinted cosine W learns at least as well as the paper's dense W"),
)
# A row has stopped improving when its last validation is less than this fraction of rsum above
# the one before: about the sampling noise of rsum on a 500-1,000-image split (R@1 near 10% on
# 500 queries has a standard error of 1.3 points).
STOPPED_IMPROVING_FRACTION = 0.03


def define_flags() -> None:
    """Defines the command's flags; called by run() only (see data_prep/build_shards.py)."""
    flags.DEFINE_string("results_dir", DEFAULT_RESULTS_DIR, "Folder with runs/ and benchmarks/.")
    flags.DEFINE_string("output", DEFAULT_OUTPUT, "The page to write (or check).")
    flags.DEFINE_bool("check", False, "Write nothing; exit 1 if --output differs from what the JSON gives.")


class ResultsFormatError(ValueError):
    """A record or report that cannot be read; the message names the file and the reason."""


def _load_json_files(folder: str, required: Sequence[str]) -> list[tuple[str, dict]]:
    """(file name, content) of folder/*.json, sorted by name; each must hold the required keys."""
    loaded = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path, encoding="utf-8") as json_file:
                content = json.load(json_file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ResultsFormatError(f"{path}: cannot read it as JSON: {error}") from error
        if not isinstance(content, dict):
            raise ResultsFormatError(f"{path}: expected a JSON object, got {type(content).__name__}")
        missing = [key for key in required if key not in content]
        if missing:
            raise ResultsFormatError(f"{path}: missing keys {missing}")
        loaded.append((os.path.basename(path), content))
    return loaded


def load_records(results_dir: str) -> dict[str, dict[str, dict]]:
    """dataset -> row -> run record, from results_dir/runs/*.json."""
    records = {}
    for _, record in _load_json_files(os.path.join(results_dir, RUNS_DIR),
                                      ("dataset", "row", "description", "command", "wall_seconds",
                                       "results")):
        records.setdefault(record["dataset"], {})[record["row"]] = record
    return records


def load_benchmarks(results_dir: str) -> list[tuple[str, dict]]:
    """(file name, report) of results_dir/benchmarks/*.json, sorted by file name."""
    return _load_json_files(os.path.join(results_dir, BENCHMARKS_DIR),
                            ("benchmark", "machine", "settings", "figures", "ratios", "date"))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table (`tables.format_table`)."""
    return tables.format_table(header, rows, style=tables.MARKDOWN)


def recall(value: float) -> str:
    """R@K and rsum, percent: one decimal."""
    return f"{value:.1f}"


def rank(value: float) -> str:
    """medr: an integer, or one decimal for a mean over folds."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def wall_time(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _wall_time_of(record: dict) -> str:
    resumed = " (resumed: this part only)" if record.get("resumed") else ""
    return wall_time(record["wall_seconds"]) + resumed


def number(value: float) -> str:
    """A benchmark figure or ratio: integers as they are, else three significant digits
    (thousands separated)."""
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def machine_text(machine: dict) -> str:
    """"key: value" pairs in name order; lists joined, [] as none, dicts as their values."""
    def text(value) -> str:
        if isinstance(value, list):
            return "; ".join(text(item) for item in value) or "none"
        if isinstance(value, dict):
            return " ".join(str(item) for item in value.values() if item not in ("", None))
        return str(value)
    return ", ".join(f"{key}: {text(machine[key])}" for key in sorted(machine))


def _metrics(record: dict, split: str) -> dict:
    metrics = record["results"].get("metrics", {})
    if split not in metrics:
        raise ResultsFormatError(f"record {record['dataset']}-{record['row']}: no {split!r} metrics")
    return metrics[split]


def stage_curves(record: dict) -> str:
    """"stage 1: 60: 158.7; stage 2: 10: 175.0": the validation rsum of every stage the run
    trained, after each validated epoch (empty for records without a curve)."""
    points = record["results"].get("validation_curve", [])
    stages = sorted({point["stage"] for point in points})
    return "; ".join(f"stage {stage}: " + ", ".join(f"{_epoch(point)}: {recall(point['rsum'])}"
                                                     for point in points if point["stage"] == stage)
                     for stage in stages)


def _run_details(record: dict) -> list[str]:
    curves = stage_curves(record)
    return [
        f"Wall time {_wall_time_of(record)}, finished {record.get('finished', 'at an unknown time')}"
        f" on {machine_text(record.get('machine', {})) or 'an unrecorded machine'}."
        + (f" Validation rsum by epoch, {curves}." if curves else ""),
        "",
        "```",
        record["command"],
        "```",
    ]


def validation_curve(record: dict) -> str:
    """"4: 51.1, 8: 60.2": the run's validation rsum after each validated epoch of its last
    stage (results.json's validation_curve; records written before it existed have none)."""
    return ", ".join(f"{_epoch(point)}: {recall(point['rsum'])}" for point in last_stage_curve(record))


def _epoch(point: dict) -> str:
    """A validation curve point's epoch, to two decimals at most."""
    return number(round(point["epoch"], 2))


def last_stage_curve(record: dict) -> list[dict]:
    """The validation curve points of the record's last stage, in order."""
    results = record["results"]
    return [point for point in results.get("validation_curve", []) if point["stage"] == results.get("stage")]


def convergence(record: dict) -> str:
    """Whether the row had stopped improving, from its last two validations."""
    points = last_stage_curve(record)
    if len(points) < 2:
        return "fewer than two validations: unknown"
    previous, last = points[-2]["rsum"], points[-1]["rsum"]
    change = (last - previous) / previous if previous else float("inf")
    state = ("stopped improving" if change < STOPPED_IMPROVING_FRACTION else "still rising")
    return (f"{state} (val rsum {recall(previous)} at epoch {_epoch(points[-2])}, "
            f"{recall(last)} at {_epoch(points[-1])}: {change:+.1%})")


def claims_checked(rows: dict[str, dict], split: str) -> list[str]:
    """One line per CLAIMS entry whose two rows are in `rows`, and one per row on whether it
    had stopped improving."""
    lines = []
    for row, baseline, least_ratio, claim in CLAIMS:
        if row not in rows or baseline not in rows:
            continue
        value, base = _metrics(rows[row], split)["rsum"], _metrics(rows[baseline], split)["rsum"]
        ratio = value / base
        verdict = "holds" if ratio >= least_ratio else "fails"
        lines.append(f"- {row} {recall(value)} vs {baseline} {recall(base)}, {ratio:.2f}x: "
                     f"{claim}: {verdict}.")
    if not lines:
        return []
    lines += [f"- {name}: {convergence(rows[name])}." for name in rows]
    return [f"Claims checked (rsum on the \"{split}\" split; a row has stopped improving when its "
            f"last validation is less than {STOPPED_IMPROVING_FRACTION:.0%} above the one before):",
            "", *lines, ""]


def is_main_row(name: str) -> bool:
    """The main run and its variants (the Flickr8k table), as opposed to ablation rows."""
    return name == MAIN_ROW or name.startswith(MAIN_ROW + "_")


def _is_held_out(name: str) -> bool:
    row = run_experiments.ROWS["flickr8k"].get(name)
    return bool(row and row.held_out)


def flickr8k_section(records: dict[str, dict]) -> list[str]:
    lines = ["## Flickr8k", ""]
    main_rows = [name for name in _table_order("flickr8k", records) if is_main_row(name)]
    dev_rows = [name for name in main_rows if not _is_held_out(name)]
    held_out_rows = [name for name in main_rows if _is_held_out(name)]
    header = ["method", "i2t R@1", "i2t R@5", "i2t R@10", "i2t medr",
              "t2i R@1", "t2i R@5", "t2i R@10", "t2i medr"]
    rows = []
    for name in dev_rows:
        rows.append([f"this implementation ({name})", *_recall_and_rank(records[name], FLICKR8K_SPLIT)])
    for method, (i2t_r1, t2i_r1) in PUBLISHED_FLICKR8K_R1.items():
        rows.append([method, recall(i2t_r1), "", "", "", recall(t2i_r1), "", "", ""])
    lines += [
        f"Evaluated on the 1,000 dev images (the split built as \"{FLICKR8K_SPLIT}\"; the shared "
        "copy has no test split, so its dev split is the test set), next to published figures on "
        f"the 1K test split from {PUBLISHED_SOURCE}; i2t: image->text, t2i: text->image, R@K in "
        "percent.",
        "",
        *_table(header, rows),
        "",
    ]
    for name in dev_rows:
        lines += [f"{name}: {records[name]['description']}.", "", *_run_details(records[name]), ""]
    if held_out_rows:
        lines += [
            "The main recipe's choices, made on the 500 images held out of train (the last 500 "
            "of its list, built as \"val\" in the held-out shards; the rows train on the other "
            "5,500 and do not see dev):",
            "",
            *_table(["row", *header[1:], "rsum"],
                    [[name, *_recall_and_rank(records[name], "val"),
                      recall(_metrics(records[name], "val")["rsum"])] for name in held_out_rows]),
            "",
        ]
        for name in held_out_rows:
            lines += [f"{name}: {records[name]['description']}.", "", *_run_details(records[name]), ""]
    missing = [name for name in run_experiments.ROWS["flickr8k"]
               if is_main_row(name) and name not in records]
    if missing:
        lines.append(f"{NOT_RUN.capitalize()}: {', '.join(missing)} (`python -m "
                     f"experiments.run_experiments --dataset=flickr8k --rows={','.join(missing)}`).")
    return lines + [""]


def _recall_and_rank(record: dict, split: str) -> list[str]:
    """R@1/5/10 and medr of image->text, then of text->image, as table cells."""
    metrics = _metrics(record, split)
    return [*(recall(metrics[f"i2t_r{k}"]) for k in (1, 5, 10)), rank(metrics["i2t_medr"]),
            *(recall(metrics[f"t2i_r{k}"]) for k in (1, 5, 10)), rank(metrics["t2i_medr"])]


def _table_order(dataset: str, rows: dict[str, dict]) -> list[str]:
    """The registry's rows first, in table order, then any others by name."""
    known = [name for name in run_experiments.ROWS.get(dataset, {}) if name in rows]
    return known + sorted(set(rows) - set(known))


def _ablation_setting(dataset: str) -> list[str]:
    """The comment of the dataset's ablation flagfile (what every row shares), as a paragraph."""
    path = REPO / run_experiments.ablation_config(dataset)
    if not path.is_file():
        return []
    comment = " ".join(line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
                       if line.startswith("#"))
    return [f"Setting ({run_experiments.ablation_config(dataset)}): {comment}", ""] if comment else []


def ablation_table(dataset: str, records: dict[str, dict]) -> list[str]:
    rows = {name: record for name, record in records.items() if not is_main_row(name)}
    lines = [f"### {dataset}", ""]
    if not rows:
        return lines + [f"{NOT_RUN.capitalize()} (`python -m experiments.run_experiments "
                        f"--dataset={dataset} --rows=all`).", ""]
    order = _table_order(dataset, rows)
    split = "test" if all("test" in rows[name]["results"].get("metrics", {}) for name in order) else "val"
    table_rows = []
    for name in order:
        metrics = _metrics(rows[name], split)
        table_rows.append([name, rows[name]["description"],
                           *(recall(metrics[column]) for column in evaluation.RECALL_KEYS),
                           recall(metrics["rsum"]), validation_curve(rows[name]), _wall_time_of(rows[name])])
    lines += [
        *_ablation_setting(dataset),
        f"{dataset} ablations on the \"{split}\" split: i2t image->text, t2i text->image, R@K in "
        "percent, rsum the sum of the six.",
        "",
        *_table(["row", "description", "i2t R@1", "i2t R@5", "i2t R@10",
                 "t2i R@1", "t2i R@5", "t2i R@10", "rsum", "val rsum by epoch", "wall time"], table_rows),
        "",
        *claims_checked({name: rows[name] for name in order}, split),
    ]
    missing = [name for name in run_experiments.ROWS.get(dataset, {})
               if name not in rows and not is_main_row(name)]
    if missing:
        lines += [f"{NOT_RUN.capitalize()}: {', '.join(missing)}.", ""]
    machines = sorted({machine_text(rows[name].get("machine", {})) for name in order})
    lines += ["Machine: " + " / ".join(machines) + ".", "", "Commands:", ""]
    lines += [f"- {name}: `{rows[name]['command']}`" for name in order]
    return lines + [""]


def ablations_section(records: dict[str, dict[str, dict]]) -> list[str]:
    lines = ["## Ablations", ""]
    datasets = list(run_experiments.ROWS) + sorted(set(records) - set(run_experiments.ROWS))
    for dataset in datasets:
        lines += ablation_table(dataset, records.get(dataset, {}))
    return lines


def _name_value_table(values: dict, format_value) -> list[str]:
    if not values:
        return ["(none)"]
    return _table(["name", "value"], [[name, format_value(values[name])] for name in sorted(values)])


def _setting(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def benchmarks_section(benchmarks: list[tuple[str, dict]]) -> list[str]:
    lines = ["## Benchmarks", ""]
    if not benchmarks:
        return lines + [f"{NOT_RUN.capitalize()} (each script in experiments/benchmarks takes "
                        "--output_json=experiments/results/benchmarks/<name>.json).", ""]
    for file_name, report in benchmarks:
        lines += [
            f"### {report['benchmark']} ({file_name})", "",
            f"On {machine_text(report['machine'])}; {report['date']}.", "",
            "Figures:", "", *_name_value_table(report["figures"], number), "",
            "Ratios:", "", *_name_value_table(report["ratios"], number), "",
            "Settings:", "", *_name_value_table(report["settings"], _setting), "",
        ]
    return lines


def render(results_dir: str) -> str:
    """The whole page, from results_dir/runs and results_dir/benchmarks."""
    records = load_records(results_dir)
    lines = [
        "# Results",
        "",
        f"Generated by `{REGENERATE}` from experiments/results/runs/*.json (written by "
        "`python -m experiments.run_experiments`) and experiments/results/benchmarks/*.json: "
        f"do not edit by hand. Regenerate with `{REGENERATE}`; `{REGENERATE} --check` fails when "
        "this page is out of date.",
        "",
        *flickr8k_section(records.get("flickr8k", {})),
        *ablations_section(records),
        *benchmarks_section(load_benchmarks(results_dir)),
    ]
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        page = render(FLAGS.results_dir)
    except ResultsFormatError as error:
        sys.exit(f"write_results: error: {error}")
    if FLAGS.check:
        current = open(FLAGS.output, encoding="utf-8").read() if os.path.exists(FLAGS.output) else None
        if current != page:
            state = "is missing" if current is None else "differs from what the JSON gives"
            sys.exit(f"write_results: {FLAGS.output} {state} (edited by hand, or the JSON changed): "
                     f"regenerate it with `{REGENERATE}`")
        print(f"{FLAGS.output} is up to date")
        return
    directory = os.path.dirname(FLAGS.output)
    if directory:
        os.makedirs(directory, exist_ok=True)
    write_atomically(FLAGS.output, page.encode("utf-8"))
    print(f"wrote {FLAGS.output}")


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
