"""The one exception type the CLI turns into a single line and a non-zero exit."""


class GsmtuneError(Exception):
    """A user mistake or an unavailable resource: the message says what is wrong and how to fix it."""
