"""Method versions of a run's per-seed rows: which version of its method made a row, which rows another version made
than the one registered now, and the one version of each method that the summaries, the verdict and the study's
report take (two versions' rows are two methods' numbers: never averaged). A leaf of the experiments package: it
imports none of the modules that use it."""

from ..guides.registry import METHODS
from .table import base_guide, seed_list


def method_version(name) -> int | None:
    """The :attr:`~pyro_lora.guides.registry.Method.version` of the method that makes the row name ``name`` (a
    ``+ts`` row's is its method's); None for a method not registered here (its rows are not judged by version)."""
    method = METHODS.get(base_guide(name))
    return None if method is None else method.version


def row_version(row) -> int:
    """The version of its method that made the per-seed ``row`` (``method_version``; 1 in a row written before it
    was kept)."""
    return row.get("method_version", 1)


def of_other_version(row) -> bool:
    """Whether another version of its method made the per-seed ``row`` than the one registered now
    (:func:`method_version`; never for a method not registered here): a resume reruns such rows, never averaging them
    with new ones."""
    version = method_version(row["guide"])
    return version is not None and version != row_version(row)


def older_versions(rows, guides) -> dict:
    """Method of ``guides`` -> ``(seeds, versions)``: the seeds whose rows in ``rows`` (its own or its ``+ts`` rows)
    another version of the method made than the one registered now (:func:`of_other_version`), and those versions,
    sorted (:func:`versions_of`)."""
    other = [r for r in rows if base_guide(r["guide"]) in guides and of_other_version(r)]
    return versions_of(other, lambda r: base_guide(r["guide"]))


def other_version_words(versions) -> str:
    """``"an older"`` where every method of ``versions`` (``{method: its rows' versions}``, methods registered here)
    has rows of versions below the one registered now, else ``"another"``: a row of a newer version than this code
    registers (made by newer code) is not "older". As compare's warning and the study's header word it."""
    return "an older" if all(max(vs) < method_version(name) for name, vs in versions.items()) else "another"


def split_versions(rows) -> tuple:
    """``(kept, left_out, keep)``: :func:`one_version`'s choice with the rows left out themselves (``left_out``, in
    ``rows``' order) and ``keep``: ``{method: kept version}`` for each method whose rows span several versions."""
    versions = {}
    for r in rows:
        versions.setdefault(base_guide(r["guide"]), set()).add(row_version(r))
    keep = {name: (method_version(name) if method_version(name) in vs else max(vs))
            for name, vs in versions.items() if len(vs) > 1}
    kept, left_out = [], []
    for r in rows:
        name = base_guide(r["guide"])
        (left_out if name in keep and row_version(r) != keep[name] else kept).append(r)
    return kept, left_out, keep


def one_version(rows) -> tuple:
    """``(kept, left)``: a run's per-seed ``rows`` with, for each method whose rows (its own and its ``+ts`` rows)
    span several versions of it (:func:`row_version`), those of one version alone kept: the version registered now
    (:func:`method_version`) where a row has it, else the newest there. Two versions' rows are two methods' numbers:
    averaged, they made one mean, ± and verdict of neither. A method's rows all of one version, an older one too, are
    kept (they stand as measured then). ``left``: ``{method: (seeds, versions, kept version)}``, the seeds and versions
    of the rows left out. Every reader that averages or compares per-seed rows takes ``kept`` (the summaries, the
    verdict, the study's report); the record keeps every row, and a resume of the method reruns those left out."""
    kept, left_out, keep = split_versions(rows)
    left = versions_of(left_out, lambda r: base_guide(r["guide"]))
    return kept, {name: (seeds, versions, keep[name]) for name, (seeds, versions) in left.items()}


def versions_of(rows, key) -> dict:
    """``{key(row): (seeds, versions)}``: the sorted seeds and versions (:func:`row_version`) of ``rows``, grouped by
    ``key``."""
    out = {}
    for r in rows:
        seeds, versions = out.setdefault(key(r), (set(), set()))
        seeds.add(r["seed"])
        versions.add(row_version(r))
    return {k: (sorted(seeds), sorted(versions)) for k, (seeds, versions) in out.items()}


def left_out_text(name, seeds, versions, kept) -> str:
    """What :func:`one_version` left out of method ``name``'s numbers, as its summary rows' note and the study's
    header say it: ``seed 0: rows of version 1 left out, not averaged with version 2's; ...``."""
    return (f"{seed_list(seeds)}: rows of version {', '.join(map(str, versions))} "
            f"left out, not averaged with version {kept}'s; a run of {name} reruns them (a resume naming it in --guides, "
            f"`pyro-lora study --update {name}`)")
