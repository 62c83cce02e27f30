"""The one exception type the CLI turns into a clean, one-line message."""


class CachedsegError(Exception):
    """A user-facing error: the message says what is wrong and what to do next."""
