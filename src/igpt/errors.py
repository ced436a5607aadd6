"""The one exception type for errors a user can cause (bad files, bad flags, mismatched inputs).

The CLI prints it as a single line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class IgptError(Exception):
    """A user-facing error: the message names the file, field or flag that is wrong."""
