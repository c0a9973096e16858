"""The one exception type users see: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits with status 2."""
