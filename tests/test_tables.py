"""experiments/tables.py: the one table formatter (console and markdown) and the R@K tables.

Every expected table is written out in full, so a change of layout fails here.
"""
import pytest

from dual_path import protocols
from experiments import tables

RETRIEVAL = {"i2t_r1": 63.1, "i2t_r5": 88.0, "i2t_r10": 94.25, "i2t_medr": 2.0, "i2t_meanr": 3.456,
             "t2i_r1": 50.0, "t2i_r5": 80.5, "t2i_r10": 100.0, "t2i_medr": 1.0, "t2i_meanr": 12.5,
             "rsum": 475.85}


def test_plain_columns_are_left_aligned_under_a_rule_without_trailing_spaces():
    assert tables.format_table(["rank", "score", "image"],
                               [["1", "0.9876", "photos/a.jpg"], ["10", "0.5", "b.png"]]) == [
        "rank  score   image",
        "-------------------",
        "1     0.9876  photos/a.jpg",
        "10    0.5     b.png",
    ]


def test_plain_right_aligns_the_columns_asked_and_blanks_missing_cells():
    assert tables.format_table(["", "R@1", "R@5"], [["image->text", "63.10", "8.00"],
                                                    ["rsum", "450.20"]], align="<>>") == [
        "                R@1   R@5",
        "-------------------------",
        "image->text   63.10  8.00",
        "rsum         450.20",
    ]


def test_markdown_escapes_bars_and_line_breaks_and_blanks_missing_cells():
    assert tables.format_table(["name", "value"], [["a|b", "x\ny"], ["c"], [3, 0.5]],
                               style=tables.MARKDOWN) == [
        "| name | value |",
        "| --- | --- |",
        "| a\\|b | x y |",
        "| c |  |",
        "| 3 | 0.5 |",
    ]


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="a row has 3 cells, the header 2"):
        tables.format_table(["a", "b"], [["1", "2", "3"]])
    with pytest.raises(ValueError, match=r"align '<': give one '<' or '>' per column \(2\)"):
        tables.format_table(["a", "b"], [], align="<")
    with pytest.raises(ValueError, match=r"align '<\^'"):
        tables.format_table(["a", "b"], [], align="<^")
    with pytest.raises(ValueError, match="unknown table style 'html'"):
        tables.format_table(["a"], [], style="html")


def test_retrieval_table():
    assert tables.retrieval_table(RETRIEVAL) == [
        "                R@1    R@5    R@10  medr  meanr",
        "-----------------------------------------------",
        "image->text   63.10  88.00   94.25  2.00   3.46",
        "text->image   50.00  80.50  100.00  1.00  12.50",
        "rsum         475.85",
    ]


def test_person_search_table():
    metrics = {"t2i_top1": 12.5, "t2i_top5": 40.0, "t2i_top10": 55.25, "t2i_map": 20.0}
    assert tables.person_search_table(metrics) == [
        "             top-1  top-5  top-10    mAP",
        "----------------------------------------",
        "text->image  12.50  40.00   55.25  20.00",
    ]


def test_recall_by_split_table_has_a_row_per_split_in_order():
    test = {"i2t_r1": 5.0, "i2t_r5": 25.0, "i2t_r10": 50.0, "t2i_r1": 4.0, "t2i_r5": 20.0,
            "t2i_r10": 40.0, "rsum": 144.0}
    assert tables.recall_by_split_table({"val": RETRIEVAL, "test": test}) == [
        "split  i2t_r1  i2t_r5  i2t_r10  t2i_r1  t2i_r5  t2i_r10    rsum",
        "---------------------------------------------------------------",
        "val     63.10   88.00    94.25   50.00   80.50   100.00  475.85",
        "test     5.00   25.00    50.00    4.00   20.00    40.00  144.00",
    ]


def test_every_protocol_has_its_table():
    assert set(tables.PROTOCOL_TABLES) == set(protocols.PROTOCOLS)
    for name in ("flickr_1k", "coco_1k", "coco_5k"):
        assert tables.protocol_table(name, RETRIEVAL) == tables.retrieval_table(RETRIEVAL)
    person = {"t2i_top1": 1.0, "t2i_top5": 2.0, "t2i_top10": 3.0, "t2i_map": 4.0}
    assert tables.protocol_table("cuhk_pedes", person) == tables.person_search_table(person)
    with pytest.raises(ValueError, match="no table for protocol 'x'"):
        tables.protocol_table("x", RETRIEVAL)
