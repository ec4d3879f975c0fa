"""The one exception the command lines catch."""


class UserError(Exception):
    """A problem the user can fix: a missing or mismatched checkpoint, a flag out of range, a malformed data or
    adapter file, an out folder holding another run. Its message names the file or flag and the fix.
    train.py, generate.py and the prepare scripts print it and exit without a traceback; any other exception is
    a bug, and keeps its traceback."""


def shorten(value, limit: int = 80) -> str:
    """repr(value) for a message, cut to `limit` characters: a file can hold a 10 MB string where a name should be."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
