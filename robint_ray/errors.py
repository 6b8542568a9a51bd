"""The two exception types a `robint` command turns into one line on stderr, never a traceback.

`InputError`: the user gave bad input (a path, a setting, a checkpoint, an image range): exit status 2;
library callers can catch it as a ValueError. `ClusterError`: the input is fine, but the cluster cannot
run it as asked (a node type that did not start within the wait, a node whose GPU torch cannot see):
exit status 1, and what was done stays resumable. Anything else that escapes is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """Bad input from the user: a path, a setting, a checkpoint, an image range."""


class ClusterError(RuntimeError):
    """The cluster cannot run the job as asked (for now): no room within the wait, a GPU without CUDA."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def one_line(err: BaseException) -> str:
    """An exception told in one line: the first line of its message, else its type's name."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
