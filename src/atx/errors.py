"""The one exception type atx raises for problems a user can fix (bad config, missing files),
and :func:`reason`, the one-line why of a library's long error text."""

from __future__ import annotations

import re

# torch's weights_only refusal wraps its one specific line in paragraphs of generic advice
_BOILERPLATE = re.compile(
    r"^(Weights only load failed\.|In PyTorch 2\.6|Re-running `torch\.load`|Please file an issue"
    r"|Check the documentation of torch\.load|WeightsUnpickler error:\s*$)"
)


class AtxError(Exception):
    """A user-facing error: its message is one line saying what is wrong and how to fix it."""


def reason(error: BaseException, limit: int = 200) -> str:
    """``Type: why`` of ``error`` in one line of whole words: the first line of its text that
    is not torch's generic advice, shortened at a word boundary (the full text stays in the
    exception chain, shown with ``debug=true``)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    specific = [ln for ln in lines if not _BOILERPLATE.match(ln)]
    text = re.sub(r"^.*?WeightsUnpickler error:\s*", "", (specific or lines or [""])[0])
    text = text.rstrip(" .")
    if len(text) > limit:
        text = text[: limit + 1].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."
    name = type(error).__name__
    return f"{name}: {text}" if text else name
