"""User errors: bad input that kit names in one line instead of a traceback.

Raise `KitError("path/to/file: what is wrong")` anywhere; the CLI prints the message and exits with code 2.
"""


class KitError(Exception):
    """Bad input from the user (a file, a column, a row). The message is the whole report."""

    exit_code = 2
