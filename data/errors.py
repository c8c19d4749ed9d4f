"""The one exception type the data package raises for problems a user can fix."""


class DataError(RuntimeError):
    """A one-line, user-facing data problem: what is wrong and how to fix it.

    The trainer catches this and prints only the message, so messages must stand on their own
    (name the file or setting, and the way out) and contain no newline.
    """
