"""The one exception type for user mistakes: the CLI prints its message (no traceback) and exits 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, an invalid value. The message says what
    was wrong and what to do instead."""
