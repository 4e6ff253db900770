"""The generated results page, from run records and benchmark reports written here as fixtures.

Covers: the Flickr8k main run's dev-split numbers next to the published R@1 figures, its
command and wall time; ablation tables in the registry's row order on the test split where
every row has one (else val), with rows not run listed; benchmark tables; "not run yet"
wherever JSON is missing; a clear error for an unreadable record; and the command itself
writing the page, `--check` passing on it and failing after a hand edit.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import write_results

REPO = Path(__file__).resolve().parents[1]
MACHINE = {"cpu": "Test CPU 3000", "logical_cores": 2, "memory_gib": 7.5, "tensorflow": "2.21.0",
           "keras": "3.15.0", "gpus": []}


def metrics(i2t, t2i, medr=(3.0, 4.0)) -> dict:
    """A results.json split: i2t and t2i as (R@1, R@5, R@10)."""
    values = {f"i2t_r{k}": value for k, value in zip((1, 5, 10), i2t)}
    values.update({f"t2i_r{k}": value for k, value in zip((1, 5, 10), t2i)})
    values.update(i2t_medr=medr[0], i2t_meanr=9.5, t2i_medr=medr[1], t2i_meanr=11.25,
                  rsum=sum(i2t) + sum(t2i))
    return values


def write_record(runs_dir: Path, dataset: str, row: str, splits: dict, wall_seconds: float) -> dict:
    record = {
        "dataset": dataset, "row": row, "description": f"{row} described",
        "command": f"python -m experiments.train --flagfile=experiments/configs/{dataset}.flags --row={row}",
        "wall_seconds": wall_seconds, "finished": "2025-02-01T10:00:00+00:00", "machine": MACHINE,
        "resumed": False,
        "results": {"checkpoint": f"/runs/{row}/stage1/ckpt-10", "stage": 1, "metrics": splits},
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / f"{dataset}-{row}.json").write_text(json.dumps(record, indent=2))
    return record


def write_benchmark(results_dir: Path) -> None:
    report = {
        "benchmark": "train_step", "machine": MACHINE,
        "settings": {"batch_size": 32, "backbone": "MobileNet", "sizes": [64, 224]},
        "figures": {"dual_path_examples_per_s": 41.234, "image_only_examples_per_s": 133.3,
                    "steps": 200},
        "ratios": {"dual_path_over_image_only": 0.30934},
        "date": "2025-02-01T11:00:00+00:00",
    }
    (results_dir / "benchmarks").mkdir(parents=True)
    (results_dir / "benchmarks" / "train_step.json").write_text(json.dumps(report))


@pytest.fixture
def results_dir(tmp_path) -> Path:
    runs = tmp_path / "results" / "runs"
    write_record(runs, "flickr8k", "main", {"val": metrics((20.14, 45.66, 58.04), (15.26, 38.0, 50.95),
                                                           medr=(7.0, 10.0))}, 3725.2)
    write_record(runs, "flickr8k", "ranking_only", {"val": metrics((10.0, 30.0, 40.0), (8.0, 25.0, 35.0))},
                 600.4)
    both_test = metrics((60.0, 85.0, 93.04), (45.55, 80.0, 90.0))
    write_record(runs, "synthetic", "ranking_only",
                 {"val": metrics((1.0, 2.0, 3.0), (1.0, 2.0, 3.0)), "test": both_test}, 125.6)
    write_record(runs, "synthetic", "no_position_shift",
                 {"val": metrics((2.0, 3.0, 4.0), (2.0, 3.0, 4.0)),
                  "test": metrics((50.0, 70.0, 80.0), (40.0, 60.0, 70.0))}, 42.4)
    write_benchmark(tmp_path / "results")
    return tmp_path / "results"


def section(page: str, title: str) -> str:
    """The text of the section headed exactly `title`, up to the next heading of its level or above."""
    level = len(title.split(" ")[0])
    start = page.index(f"\n{title}\n") + 1
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(page, start + len(title))
    return page[start:end.start()] if end else page[start:]


def test_flickr8k_main_run_next_to_published_figures(results_dir):
    page = write_results.render(str(results_dir))
    flickr = section(page, "## Flickr8k")
    assert ("| this implementation (main) | 20.1 | 45.7 | 58.0 | 7 | 15.3 | 38.0 | 51.0 | 10 |"
            in flickr)
    for method, (i2t, t2i) in write_results.PUBLISHED_FLICKR8K_R1.items():
        assert f"| {method} | {i2t:.1f} |  |  |  | {t2i:.1f} |  |  |  |" in flickr
    assert "| m-CNN | 24.8 |  |  |  | 20.3 |  |  |  |" in flickr
    assert '"val"' in flickr and "../shared/README.md" in flickr
    assert "Wall time 1:02:05, finished 2025-02-01T10:00:00+00:00" in flickr
    assert "```\npython -m experiments.train --flagfile=experiments/configs/flickr8k.flags --row=main\n```" in flickr


def test_ablation_tables_in_table_order_on_the_test_split_where_present(results_dir):
    page = write_results.render(str(results_dir))
    synthetic = section(page, "### synthetic")
    assert 'synthetic ablations on the "test" split' in synthetic
    ranking = "| ranking_only | ranking_only described | 60.0 | 85.0 | 93.0 | 45.5 | 80.0 | 90.0 | 453.6 |  | 2:06 |"
    shift = "| no_position_shift | no_position_shift described | 50.0 | 70.0 | 80.0 | 40.0 | 60.0 | 70.0 | 370.0 |  | 0:42 |"
    assert ranking in synthetic and shift in synthetic
    assert synthetic.index(ranking) < synthetic.index(shift)  # the registry's order, not by name
    assert ("Not run yet: both, instance_only, separate_classifiers, random_word_init, "
            "instance_only_paper, both_paper, instance_only_dense, deep_text." in synthetic)
    assert "- ranking_only: `python -m experiments.train --flagfile=experiments/configs/synthetic.flags --row=ranking_only`" in synthetic
    assert "Machine: cpu: Test CPU 3000, gpus: none, keras: 3.15.0, logical_cores: 2" in synthetic

    flickr = section(page, "### flickr8k")
    assert 'flickr8k ablations on the "val" split' in flickr
    assert "| ranking_only | ranking_only described | 10.0 | 30.0 | 40.0 | 8.0 | 25.0 | 35.0 | 148.0 |  | 10:00 |" in flickr
    assert "| main |" not in flickr
    assert "Not run yet: both, instance_only, separate_classifiers" in flickr


def test_a_row_without_test_metrics_puts_its_table_on_val(results_dir):
    write_record(results_dir / "runs", "synthetic", "both", {"val": metrics((5.0, 6.0, 7.0), (8.0, 9.0, 10.0))}, 1.0)
    synthetic = section(write_results.render(str(results_dir)), "### synthetic")
    assert 'synthetic ablations on the "val" split' in synthetic
    assert "| both | both described | 5.0 | 6.0 | 7.0 | 8.0 | 9.0 | 10.0 | 45.0 |  | 0:01 |" in synthetic
    assert "| ranking_only | ranking_only described | 1.0 | 2.0 | 3.0 |" in synthetic


def test_benchmark_tables(results_dir):
    benchmarks = section(write_results.render(str(results_dir)), "## Benchmarks")
    assert "### train_step (train_step.json)" in benchmarks
    assert "On cpu: Test CPU 3000, gpus: none, keras: 3.15.0, logical_cores: 2, memory_gib: 7.5, " \
           "tensorflow: 2.21.0; 2025-02-01T11:00:00+00:00." in benchmarks
    for line in ("| dual_path_examples_per_s | 41.2 |", "| image_only_examples_per_s | 133 |",
                 "| steps | 200 |", "| dual_path_over_image_only | 0.309 |", "| backbone | MobileNet |",
                 "| batch_size | 32 |", "| sizes | [64, 224] |"):
        assert line in benchmarks, line


def test_missing_json_says_not_run_yet(tmp_path):
    page = write_results.render(str(tmp_path))
    flickr = section(page, "## Flickr8k")
    assert ("Not run yet: main, main_stage2_20_epochs, main_stage1_adam_2e_4, main_stage1_sgd, main_stage2_batch_32, main_mobilenet_0_25, main_stage2_lr_0_01, "
            "main_stage2_7_blocks, main_stage2_10_epochs, main_no_finetune, main_no_finetune_20_epochs, main_stage1_only, "
            "main_stage1_word2vec_captions, main_stage1_random_word_init, main_stage2_hardest, "
            "main_held_out, main_held_out_stage2_hardest, main_held_out_stage2_20_epochs, "
            "main_held_out_stage2_backbone_lr_1, main_held_out_stage2_10_blocks, "
            "main_held_out_stage2_13_blocks, main_held_out_stage2_lr_0_02, "
            "main_held_out_stage2_lr_0_04, main_held_out_stage2_lr_0_02_rerun, "
            "main_held_out_stage2_bn_frozen, main_held_out_stage2_loss_weights_2_1_0_1, "
            "main_held_out_stage2_warmup, main_held_out_stage2_head_lr_0_01, "
            "main_held_out_stage2_weight_average, main_held_out_stage2_recipe, "
            "main_held_out_stage2_25_epochs, main_held_out_stage2_drop_after_12, "
            "main_held_out_stage2_recipe_rerun, main_held_out_stage2_13_blocks_lr_0_02, "
            "main_held_out_stage2_dropout_0_5, main_held_out_stage2_batch_64, "
            "main_held_out_stage2_recipe_batch_64, "
            "main_held_out_stage1_curve, main_held_out_stage1_wide_text, "
            "main_held_out_stage1_batch_64, main_held_out_stage1_lr_0_1, "
            "main_held_out_stage1_adam, main_held_out_stage1_adam_lr_5e_4, "
            "main_held_out_stage1_adam_lr_1e_3, "
            "main_held_out_stage2_from_adam, main_held_out_stage2_from_adam_lr_5e_4, "
            "main_held_out_stage2_16_epochs, main_held_out_stage2_12_epochs, "
            "main_held_out_embedding_lr_1, main_held_out_bn_training_views, "
            "main_held_out_bn_stage2_top "
            "(`python -m experiments.run_experiments --dataset=flickr8k --rows=main,") in flickr
    assert "this implementation" not in flickr
    assert "| DeViSE | 4.5 |  |  |  | 6.7 |  |  |  |" in flickr
    for dataset in ("flickr8k", "synthetic"):
        assert f"Not run yet (`python -m experiments.run_experiments --dataset={dataset} --rows=all`)." \
               in section(page, f"### {dataset}")
    assert "Not run yet (each script in experiments/benchmarks" in section(page, "## Benchmarks")
    assert page.startswith("# Results\n") and "do not edit by hand" in page
    assert page == write_results.render(str(tmp_path))


def test_an_unreadable_record_names_its_file(results_dir):
    bad = results_dir / "runs" / "synthetic-both.json"
    bad.write_text('{"dataset": "synthetic", ')
    with pytest.raises(write_results.ResultsFormatError, match="synthetic-both.json: cannot read it as JSON"):
        write_results.render(str(results_dir))
    bad.write_text('{"dataset": "synthetic", "row": "both"}')
    with pytest.raises(write_results.ResultsFormatError, match="synthetic-both.json: missing keys"):
        write_results.render(str(results_dir))


def run_command(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.write_results", *arguments],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess
def test_command_writes_the_page_and_check_catches_a_hand_edit(results_dir, tmp_path):
    output = tmp_path / "RESULTS.md"
    arguments = [f"--results_dir={results_dir}", f"--output={output}"]
    written = run_command(*arguments)
    assert written.returncode == 0, written.stderr[-2000:]
    assert output.read_text() == write_results.render(str(results_dir))

    checked = run_command(*arguments, "--check")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "up to date" in checked.stdout

    output.write_text(output.read_text().replace("| 20.1 |", "| 29.1 |"))
    edited = output.read_text()
    checked = run_command(*arguments, "--check")
    assert checked.returncode == 1
    assert f"{output} differs from what the JSON gives" in checked.stderr
    assert output.read_text() == edited  # --check writes nothing


def test_each_ablation_table_says_what_its_rows_share(results_dir):
    page = write_results.render(str(results_dir))
    for dataset in ("synthetic", "flickr8k"):
        setting = f"Setting (experiments/configs/ablations/{dataset}.flags): "
        assert setting in page
        paragraph = page.split(setting, 1)[1].split("\n", 1)[0]
        assert "stage I alone" in paragraph and "#" not in paragraph


def test_the_committed_results_page_is_what_the_committed_json_gives():
    """RESULTS.md is generated, never typed: a hand edit, or a new record without regenerating
    the page, fails here (and so in CI)."""
    page = (REPO / write_results.DEFAULT_OUTPUT).read_text(encoding="utf-8")
    assert page == write_results.render(str(REPO / write_results.DEFAULT_RESULTS_DIR)), (
        f"experiments/RESULTS.md is out of date: run `{write_results.REGENERATE}`")


def test_a_variant_of_the_main_run_joins_the_flickr8k_table_not_the_ablations(results_dir):
    write_record(results_dir / "runs", "flickr8k", "main_stage2_hardest",
                 {"val": metrics((22.0, 47.0, 60.0), (16.0, 39.0, 52.0))}, 1200)
    page = write_results.render(str(results_dir))
    flickr8k, ablations = page.split("## Ablations", 1)
    assert "| this implementation (main_stage2_hardest) | 22.0 | 47.0 | 60.0 | 3 |" in flickr8k
    assert flickr8k.index("(main) |") < flickr8k.index("(main_stage2_hardest) |")
    assert "main_stage2_hardest: main_stage2_hardest described." in flickr8k
    assert "main_stage2_hardest" not in ablations


def test_rows_that_choose_on_the_held_out_split_are_not_reported_as_dev(results_dir):
    """A held-out row's "val" is the tail of train it chose on: it gets a table of its own,
    never a line of the dev table next to the published figures."""
    write_record(results_dir / "runs", "flickr8k", "main_held_out",
                 {"val": metrics((19.4, 42.0, 54.6), (14.7, 40.4, 54.9), medr=(8.0, 8.0))}, 3643)
    flickr8k = write_results.render(str(results_dir)).split("## Ablations", 1)[0]
    dev_table, held_out = flickr8k.split("held out of train", 1)
    assert "main_held_out" not in dev_table
    assert "| main_held_out | 19.4 | 42.0 | 54.6 | 8 | 14.7 | 40.4 | 54.9 | 8 | 226.0 |" in held_out


def test_main_rows_show_the_validation_curve_of_each_stage(tmp_path):
    runs = tmp_path / "runs"
    record = write_record(runs, "flickr8k", "main", {"val": metrics((9.0, 20.0, 30.0), (8.0, 20.0, 30.0))},
                          3000.0)
    record["results"]["stage"] = 2
    record["results"]["validation_curve"] = [
        {"epoch": 60.0, "rsum": 158.66, "stage": 1, "step": 11220},
        {"epoch": 5.0, "rsum": 170.04, "stage": 2, "step": 935},
        {"epoch": 10.0, "rsum": 175.0, "stage": 2, "step": 1870}]
    (runs / "flickr8k-main.json").write_text(json.dumps(record))
    flickr = section(write_results.render(str(tmp_path)), "## Flickr8k")
    assert ("Validation rsum by epoch, stage 1: 60: 158.7; stage 2: 5: 170.0, 10: 175.0." in flickr)


def test_ablation_rows_show_the_validation_curve_of_their_last_stage(tmp_path):
    runs = tmp_path / "runs"
    record = write_record(runs, "synthetic", "both", {"val": metrics((1, 2, 3), (1, 2, 3))}, 60)
    record["results"]["validation_curve"] = [
        {"stage": 1, "step": 40, "epoch": 4.0, "rsum": 30.04},
        {"stage": 1, "step": 80, "epoch": 8.0, "rsum": 41.26},
        {"stage": 2, "step": 10, "epoch": 1.0, "rsum": 99.0}]
    (runs / "synthetic-both.json").write_text(json.dumps(record))
    page = write_results.render(str(tmp_path))
    row = next(line for line in page.splitlines() if line.startswith("| both |"))
    assert "| 4: 30.0, 8: 41.3 |" in row and "99.0" not in row
    assert "val rsum by epoch" in page


def write_curved_record(runs: Path, row: str, test_rsum_parts: tuple, curve: list[float]) -> None:
    """A synthetic ablation record whose test rsum is 2 * sum(test_rsum_parts), validated
    every 4 epochs with the rsums of `curve`."""
    record = write_record(runs, "synthetic", row, {"val": metrics((1, 2, 3), (1, 2, 3)),
                                                   "test": metrics(test_rsum_parts, test_rsum_parts)}, 60)
    record["results"]["validation_curve"] = [
        {"stage": 1, "step": 10 * index, "epoch": 4.0 * index, "rsum": rsum}
        for index, rsum in enumerate(curve, start=1)]
    (runs / f"synthetic-{row}.json").write_text(json.dumps(record))


def test_ablation_tables_check_the_papers_claims_and_whether_rows_stopped_improving(tmp_path):
    runs = tmp_path / "runs"
    write_curved_record(runs, "ranking_only", (10, 20, 20), [50.0, 100.0, 102.0])  # rsum 100
    write_curved_record(runs, "instance_only", (9, 18, 18), [40.0, 80.0, 90.0])  # rsum 90
    write_curved_record(runs, "both", (11, 22, 22), [60.0, 110.0])  # rsum 110
    page = write_results.render(str(tmp_path))
    checks = section(page, "### synthetic").split("Claims checked", 1)[1].split("Not run yet", 1)[0]
    assert ("- instance_only 90.0 vs ranking_only 100.0, 0.90x: the instance loss alone learns "
            "retrieval at least as well as the ranking loss alone: fails.") in checks
    assert "- both 110.0 vs ranking_only 100.0, 1.10x: the instance loss adds" in checks
    assert "(at least 1.1x): holds." in checks
    assert "instance_only_paper" not in checks  # that row is not run
    assert ("- ranking_only: stopped improving (val rsum 100.0 at epoch 8, 102.0 at 12: +2.0%)."
            in checks)
    assert "- instance_only: still rising (val rsum 80.0 at epoch 8, 90.0 at 12: +12.5%)." in checks
    assert "- both: still rising (val rsum 60.0 at epoch 4, 110.0 at 8: +83.3%)." in checks


def test_no_claims_are_checked_without_both_rows_of_one(results_dir):
    assert "Claims checked" not in write_results.render(str(results_dir))
