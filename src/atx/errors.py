"""The one exception type atx raises for problems a user can fix (bad config, missing files)."""


class AtxError(Exception):
    """A user-facing error: its message is one line saying what is wrong and how to fix it."""
