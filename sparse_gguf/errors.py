"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class SparseGGUFError(Exception):
    """A problem with the user's input (file, architecture, option) that has a one-line explanation."""
