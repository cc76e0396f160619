"""Progress bars over data that read the data once."""

from tqdm.auto import tqdm


def progress_bar(data, **kwargs):
    """``tqdm(data, **kwargs)`` with a single ``iter(data)``: tqdm.auto's bar takes an iterator of ``data`` when it is
    built and then iterates ``data`` afresh, so a ``DataLoader`` started its workers twice and a source whose each
    ``iter`` moves on (a stream, a sampler drawing anew) lost a pass to the bar. ``total`` defaults to ``len(data)``
    where there is one."""
    if "total" not in kwargs:
        try:
            kwargs["total"] = len(data)
        except TypeError:  # a generator, an IterableDataset: no length
            pass
    return tqdm(iter(data), **kwargs)
