"""The one exception type a user sees: its message is printed as a single line by the CLI."""


class KvconvertError(Exception):
    """A user-facing error (bad input, unsupported model, missing file). The CLI prints `error: <message>`."""
