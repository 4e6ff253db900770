"""Text tables: one formatter for the console and for RESULTS.md, and the R@K tables on it.

`format_table` turns a header and rows of cells into lines, in one of two styles:

  PLAIN (the console)               MARKDOWN (experiments/RESULTS.md)

                  R@1    R@5        | row | i2t R@1 | rsum |
  --------------------------        | --- | --- | --- |
  image->text   63.10  88.00        | both | 63.1 | 450.2 |
  rsum         450.20

The metric tables show what `dual_path.evaluation` computes (R@K, top-K and mAP in percent,
ranks from 1), two decimals: `retrieval_table` and `person_search_table` one split by an
evaluation protocol (`protocol_table` picks the protocol's), `recall_by_split_table` the
splits of a training run's results.
"""
from typing import Callable, Sequence

from dual_path import evaluation

PLAIN = "plain"
MARKDOWN = "markdown"
STYLES = (PLAIN, MARKDOWN)
LEFT, RIGHT = "<", ">"
PLAIN_GAP = "  "

RETRIEVAL_COLUMNS = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("medr", "medr"),
                     ("meanr", "meanr"))
RETRIEVAL_DIRECTIONS = (("image->text", "i2t"), ("text->image", "t2i"))
PERSON_SEARCH_COLUMNS = (("top-1", "t2i_top1"), ("top-5", "t2i_top5"), ("top-10", "t2i_top10"),
                         ("mAP", "t2i_map"))
RECALL_BY_SPLIT_COLUMNS = (*evaluation.RECALL_KEYS, "rsum")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, style: str = PLAIN,
                 align: str | None = None) -> list[str]:
    """The table's lines, without line ends.

    Args:
      header: C column titles.
      rows: rows of at most C cells (str() of each is shown); missing cells at a row's end
        are blank.
      style: PLAIN: the header, a rule of dashes as long as it, then the rows; each column
        padded to its widest cell, columns PLAIN_GAP apart, no trailing spaces.
        MARKDOWN: a GitHub table, "|" and line breaks inside cells escaped.
      align: PLAIN only: one LEFT or RIGHT per column, e.g. "<>>" (default: all LEFT).
    """
    cells = _cells(header, rows)
    if style == PLAIN:
        return _plain(cells, align or LEFT * len(header))
    if style == MARKDOWN:
        return _markdown(cells)
    raise ValueError(f"unknown table style {style!r}; known: {', '.join(STYLES)}")


def _cells(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """[header, *rows] as strings, every row padded with "" to the header's length."""
    too_long = [row for row in rows if len(row) > len(header)]
    if too_long:
        raise ValueError(f"a row has {len(too_long[0])} cells, the header {len(header)}")
    return [[str(cell) for cell in row] + [""] * (len(header) - len(row))
            for row in [header, *rows]]


def _plain(cells: list[list[str]], align: str) -> list[str]:
    if len(align) != len(cells[0]) or set(align) - {LEFT, RIGHT}:
        raise ValueError(f"align {align!r}: give one {LEFT!r} or {RIGHT!r} per column "
                         f"({len(cells[0])})")
    widths = [max(len(cell) for cell in column) for column in zip(*cells)]
    lines = [PLAIN_GAP.join(f"{cell:{side}{width}}" for cell, side, width
                            in zip(row, align, widths)).rstrip() for row in cells]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def _markdown(cells: list[list[str]]) -> list[str]:
    header, *rows = cells
    rule = "|" + "|".join(" --- " for _ in header) + "|"
    return [_markdown_row(header), rule, *(_markdown_row(row) for row in rows)]


def _markdown_row(row: list[str]) -> str:
    return "| " + " | ".join(_markdown_cell(cell) for cell in row) + " |"


def _markdown_cell(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _two_decimals(value: float) -> str:
    """A metric of `dual_path.evaluation` (percent, or a rank) as the console tables show it."""
    return f"{value:.2f}"


def _numbers_right(columns: int) -> str:
    """LEFT for the row labels, RIGHT for the columns of numbers after them."""
    return LEFT + RIGHT * (columns - 1)


def retrieval_table(metrics: dict) -> list[str]:
    """R@1/5/10 (percent), medr and meanr of one split, a row per direction, then rsum.

    metrics: `evaluation.retrieval_metrics`, {"i2t_r1": ..., "t2i_meanr": ..., "rsum": ...}.
    """
    header = ["", *(title for title, _ in RETRIEVAL_COLUMNS)]
    rows = [[label, *(_two_decimals(metrics[f"{prefix}_{key}"]) for _, key in RETRIEVAL_COLUMNS)]
            for label, prefix in RETRIEVAL_DIRECTIONS]
    rows.append(["rsum", _two_decimals(metrics["rsum"])])
    return format_table(header, rows, align=_numbers_right(len(header)))


def person_search_table(metrics: dict) -> list[str]:
    """top-1/5/10 and mAP (percent) of text -> image person search, one row.

    metrics: `evaluation.person_search_metrics`, {"t2i_top1": ..., "t2i_map": ...}.
    """
    header = ["", *(title for title, _ in PERSON_SEARCH_COLUMNS)]
    rows = [["text->image", *(_two_decimals(metrics[key]) for _, key in PERSON_SEARCH_COLUMNS)]]
    return format_table(header, rows, align=_numbers_right(len(header)))


PROTOCOL_TABLES: dict[str, Callable[[dict], list[str]]] = {
    "flickr_1k": retrieval_table,
    "coco_1k": retrieval_table,
    "coco_5k": retrieval_table,
    "cuhk_pedes": person_search_table,
}
"""The table of each protocol of `dual_path.protocols.PROTOCOLS`, by name."""


def protocol_table(protocol: str, metrics: dict) -> list[str]:
    """The table of a protocol's metrics (`dual_path.protocols.Protocol.metrics`)."""
    if protocol not in PROTOCOL_TABLES:
        raise ValueError(f"no table for protocol {protocol!r}; known: {', '.join(PROTOCOL_TABLES)}")
    return PROTOCOL_TABLES[protocol](metrics)


def recall_by_split_table(metrics_by_split: dict[str, dict]) -> list[str]:
    """R@1/5/10 of both directions and rsum (percent), one row per split, in dict order.

    metrics_by_split: {split name: `evaluation.retrieval_metrics` dict}, as a training run's
    results["metrics"] holds them.
    """
    header = ["split", *RECALL_BY_SPLIT_COLUMNS]
    rows = [[split, *(_two_decimals(metrics[key]) for key in RECALL_BY_SPLIT_COLUMNS)]
            for split, metrics in metrics_by_split.items()]
    return format_table(header, rows, align=_numbers_right(len(header)))
