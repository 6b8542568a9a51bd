"""The one exception type that means "the user gave bad input".

The CLI turns it into one line on stderr and exit status 2; library callers can catch it as a
ValueError. Anything else that escapes is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from the user: a path, a setting, a checkpoint, an image range."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)
