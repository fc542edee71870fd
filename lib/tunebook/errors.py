"""The one exception type users see: its message says what is wrong, where, and what to do."""


class TunebookError(Exception):
    """Bad input or a missing prerequisite; the CLI prints the message alone, without a traceback."""
