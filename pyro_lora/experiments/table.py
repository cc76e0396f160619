"""The comparison table: one column spec for ``compare``, ``evaluate`` and the study."""

import math
import numbers
from collections import Counter
from typing import NamedTuple, Optional

from ..guides.registry import METHODS, VALIDATION_TUNED, join_notes


class Column(NamedTuple):
    """One metric column: the row key, its header, the digits shown, which way is better (``"min"``,
    ``"max"``, or None for a cost that is not ranked), and the score that tells nothing (an AUROC's 0.5), where one
    does: a best that does not beat it is said so, never shown as a success."""

    key: str
    title: str
    digits: int
    better: Optional[str] = None
    chance: Optional[float] = None

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
OOD = [Column("ood_auroc_entropy", "OOD AUROC entropy", 3, "max", 0.5), Column("ood_auroc_mi", "OOD AUROC MI", 3, "max", 0.5)]
COLUMNS = {c.key: c for c in TABLE + OOD}  # key -> Column: every metric a table shows

# a method's row after temperature scaling fitted on the validation split on its averaged predictive
TS_SUFFIX = "+ts"


def ts_name(guide: str) -> str:
    """The name of ``guide``'s ``+ts`` row."""
    return guide + TS_SUFFIX


def base_guide(name: str) -> str:
    """The method a row name belongs to: ``laplace`` for ``laplace+ts``, the name itself otherwise."""
    return name.removesuffix(TS_SUFFIX)


def check_one_row_each(rows, holder="the rows hold") -> None:
    """Refuse per-seed ``rows`` that repeat a (guide, dataset, seed): a table would average the repeat as one more
    seed and a verdict keep only one of the two. ``holder`` begins the message (``"its per_seed holds"``)."""
    seen = set()
    for r in rows:
        key = (r.get("guide"), r.get("dataset"), r.get("seed"))
        if key in seen:
            raise ValueError(f"{holder} the row of {key} twice (a rerun's rows joined to the first run's?): keep one "
                             "row per method, dataset and seed")
        seen.add(key)


def seed_list(seeds) -> str:
    """``seed 0`` or ``seeds 0, 2``: the seeds ``seeds`` (numbers or their texts) as every message and note names
    them."""
    return f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"


def row_setting(row) -> Optional[str]:
    """A row's setting ("no validation data" / "validation-tuned"): as recorded, else, for a record from before it was
    recorded, its method's (:attr:`~pyro_lora.guides.registry.Method.setting`; a ``+ts`` row is validation-tuned);
    None for a method this process does not know."""
    if row.get("setting"):
        return row["setting"]
    name = row["guide"]
    if name.endswith(TS_SUFFIX):
        return VALIDATION_TUNED
    return METHODS[name].setting if name in METHODS else None


def columns(*keys):
    """The :class:`Column` of each metric in ``keys``, in that order (a sub-table, e.g. the study's)."""
    return [COLUMNS[k] for k in keys]


def format_table(rows):
    """Markdown table, one row per (guide, evaluation set); ``mean ± std`` where rows carry ``_std``.

    Rows with a ``note`` are marked ``(note)`` and their notes listed under the table, each note once with the
    rows it applies to. A value that is not available (NaN or None: e.g. the mutual information of a predictive
    without weight samples) reads ``n/a``. The ``setting`` column says whether a row's method fitted anything on the
    validation split ("validation-tuned") or not ("no validation data"): :func:`row_setting`.
    """
    setting = any(row_setting(r) for r in rows)
    head = "| guide | " + "setting | " * setting + "dataset | " + " | ".join(c.title for c in TABLE) + " | OOD AUROC H / MI |"
    lines = [head, "|" + "---|" * (len(TABLE) + 3 + setting)]
    rows = _mark_partial_seeds(rows)
    notes = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(f"{r['guide']} on {r['dataset']}")
    listed = [f"Note ({', '.join(where)}): {note}" for note, where in notes.items()]
    return "\n".join(lines + [format_row(r, setting) for r in rows] + ([""] + listed if listed else []))


def partial_seeds_note(row, rows) -> Optional[str]:
    """What a summary row averaged over other seeds than most ``rows`` of its evaluation set must say, else None:
    side by side, a mean over other seeds (a method failed, a run was cut short, a method got an extra seed) reads
    as a comparison it is not. Where as many rows have two seed sets, the larger is the common one."""
    seeds = row.get("seeds")
    if not seeds:  # None, or a row of no seed (its rows all left out, results.summarize_run): its note says why
        return None
    counts = Counter(tuple(sorted(r["seeds"])) for r in rows if r.get("dataset") == row.get("dataset") and r.get("seeds"))
    common = max(counts, key=lambda k: (counts[k], len(k)))
    if tuple(sorted(seeds)) == common:
        return None
    missing = [s for s in common if s not in seeds]
    if missing:
        return (f"a mean over {seed_list(seeds)} only: seed(s) "
                f"{', '.join(map(str, missing))} missing")
    return f"a mean over seeds {', '.join(map(str, seeds))}, where the other rows have {', '.join(map(str, common))} only"


def _mark_partial_seeds(rows):
    """``rows`` with :func:`partial_seeds_note` joined to their notes."""
    marked = []
    for r in rows:
        note = partial_seeds_note(r, rows)
        if note:
            r = {**r, "note": join_notes(r.get("note"), note)}
        marked.append(r)
    return marked


def not_available(value):
    """None (JSON null), NaN or an infinity: a value the run could not compute (see
    :func:`~pyro_lora.experiments.scoring.score`). An infinity is n/a as NaN is: the run's writer records either as
    null, so one in a ``results.json`` is a hand edit (JSON readers take ``-Infinity``), never the best mean."""
    return value is None or (isinstance(value, numbers.Real) and not math.isfinite(value))


def format_cell(row, key, digits, missing=""):
    """``row[key]`` with ``digits`` decimals, ``± row[key + "_std"]`` where the row is a mean over several seeds (its
    ``seeds``; a row without them: where its std is nonzero), ``± 0.000`` too: a std of exactly 0 and one of 1e-17
    read alike, and a single seed never shows one; ``n/a`` for a value that is not available, ``missing`` for a key
    the row lacks (not measured there)."""
    if key not in row:
        return missing
    std = row.get(key + "_std")
    several = len(row["seeds"]) > 1 if row.get("seeds") is not None else bool(std)
    spread = several and std is not None and not not_available(std) and not not_available(row[key])
    return _number(row[key], digits) + (f" ± {shown(std, digits)}" if spread else "")


def shown(value, digits) -> str:
    """``value`` as the tables print it, with ``digits`` decimals; one that rounds to zero without a sign: ``-0.000``
    would read as below ``0.000``, a difference the values do not have at that precision. Every comparison the
    tables, the verdict and the study make is on these strings (a tie as printed never beats)."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and not float(text) else text


# values this close are one value up to float round-off (a method at a grid edge equal to the MAP it starts from
# differs by ~1e-8 relative): never a difference, even where a rounding boundary falls between them
ROUND_OFF = 1e-6


def read_apart(a, b, digits) -> bool:
    """Whether ``a`` and ``b`` read differently with ``digits`` decimals (:func:`shown`) and are more than float
    round-off apart (relative :data:`ROUND_OFF`): 0.4004999999 and 0.4005000001 print 0.400 and 0.401, a difference
    the values do not have. No claim that one value beats another is made without it."""
    return shown(a, digits) != shown(b, digits) and not math.isclose(a, b, rel_tol=ROUND_OFF, abs_tol=ROUND_OFF * 1e-3)


def _number(value, digits):
    return "n/a" if not_available(value) else shown(value, digits)


def format_row(r, setting=True):
    """One line of :func:`format_table` (``setting``: with the setting column)."""
    ood = " / ".join(format_cell(r, c.key, c.digits) for c in OOD) if "ood_auroc_entropy" in r else ""
    guide = r["guide"] + (" (note)" if r.get("note") else "")
    return f"| {guide} | " + (f"{row_setting(r) or ''} | " if setting else "") + f"{r['dataset']} | " + " | ".join(format_cell(r, c.key, c.digits) for c in TABLE) + f" | {ood} |"
