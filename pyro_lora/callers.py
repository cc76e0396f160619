"""Where the library's warnings point: the first line outside the library, whatever wrappers lie between."""

from __future__ import annotations

import sys

# the packages a warning looks past: the library's own, and those whose machinery calls into it (Pyro's SVI running a
# guide, torch's Module.__call__ and DataLoader running a collator, tqdm's progress bar iterating the data,
# transformers' and peft's forwards running a hook, contextlib and functools wrappers)
_PASSED = frozenset({"pyro_lora", "guides", "pyro", "torch", "tqdm", "transformers", "peft", "accelerate", "contextlib",
                     "functools"})


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` of the calling frame point at the first frame outside the
    library: ``warnings.warn(message, stacklevel=user_stacklevel())``. A fixed count breaks with every wrapper a
    method gains (the guides' dtype guard added one) or loses, and with the path taken to it (a classmethod building
    the guide, a function calling its search); a frame's module names where it belongs, whatever the install's paths."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _PASSED:
        frame, level = frame.f_back, level + 1
    return level
