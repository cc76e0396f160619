"""The comparison table: one column spec for ``compare``, ``evaluate`` and the study."""

import math
import numbers
from typing import NamedTuple, Optional


class Column(NamedTuple):
    """One metric column: the row key, its header, the digits shown, and which way is better (``"min"``,
    ``"max"``, or None for a cost that is not ranked)."""

    key: str
    title: str
    digits: int
    better: Optional[str] = None

    @property
    def lower_better(self) -> bool:
        """Whether a lower value is better (costs, which are not ranked, count as lower-is-better)."""
        return self.better != "max"


# the columns of compare's table, in order
TABLE = [Column("accuracy", "accuracy", 3, "max"), Column("ece", "ECE x100", 2, "min"), Column("nll", "NLL", 3, "min"),
         Column("brier", "Brier", 3, "min"), Column("mutual_information", "MI", 4), Column("aurc", "AURC", 3, "min"),
         Column("fit_seconds", "fit s", 1), Column("predict_seconds_per_1000", "predict s/1k", 1),
         Column("fit_memory_mb", "peak MB", 0), Column("extra_parameters", "+params", 0)]
# rows on a shifted evaluation set also carry the OOD AUROC of the predictive entropy and of the mutual information
OOD = [Column("ood_auroc_entropy", "OOD AUROC entropy", 3, "max"), Column("ood_auroc_mi", "OOD AUROC MI", 3, "max")]
COLUMNS = {c.key: c for c in TABLE + OOD}  # key -> Column: every metric a table shows


def columns(*keys):
    """The :class:`Column` of each metric in ``keys``, in that order (a sub-table, e.g. the study's)."""
    return [COLUMNS[k] for k in keys]


def format_table(rows):
    """Markdown table, one row per (guide, evaluation set); ``mean ± std`` where rows carry ``_std``.

    Rows with a ``note`` are marked ``(note)`` and their notes listed under the table. A value that is not
    available (NaN or None: e.g. the mutual information of a predictive without weight samples) reads ``n/a``.
    """
    head = "| guide | dataset | " + " | ".join(c.title for c in TABLE) + " | OOD AUROC H / MI |"
    lines = [head, "|" + "---|" * (len(TABLE) + 3)]
    notes = [f"Note ({r['guide']} on {r['dataset']}): {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + [format_row(r) for r in rows] + ([""] + notes if notes else []))


def not_available(value):
    """None (JSON null) or NaN: a value the run could not compute (see :func:`~pyro_lora.experiments.scoring.score`)."""
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def format_cell(row, key, digits, missing=""):
    """``row[key]`` with ``digits`` decimals, ``± row[key + "_std"]`` where the row has a nonzero std; ``n/a`` for a
    value that is not available, ``missing`` for a key the row lacks (not measured there)."""
    if key not in row:
        return missing
    std = row.get(key + "_std")
    return _number(row[key], digits) + (f" ± {std:.{digits}f}" if std and not not_available(std) and not not_available(row[key]) else "")


def _number(value, digits):
    return "n/a" if not_available(value) else f"{value:.{digits}f}"


def format_row(r):
    """One line of :func:`format_table`."""
    ood = " / ".join(_number(r[c.key], c.digits) for c in OOD) if "ood_auroc_entropy" in r else ""
    guide = r["guide"] + (" (note)" if r.get("note") else "")
    return f"| {guide} | {r['dataset']} | " + " | ".join(format_cell(r, c.key, c.digits) for c in TABLE) + f" | {ood} |"
