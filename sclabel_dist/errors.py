"""The one exception type for user and data errors; the CLIs turn it into one line and exit code 2."""


class SclabelError(Exception):
    """A problem with the user's input (file, key, gene, row, config): the message names it."""
