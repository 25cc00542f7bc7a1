"""The one user-error type of fire-onnx.

Anything a user can cause (a missing file, a wrong tensor name, a bad directions file) raises
:class:`FireError` with a one-line message. The CLI maps it to exit code 1 and prints it without a
traceback; any other exception is a bug and keeps its traceback.
"""

CHECK_FAILED_EXIT = 3  # the command ran, and a check it was asked to make (eval --fail-*, the demo's) failed


class FireError(Exception):
    """A user-facing error: the message is one line and says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Refused(FireError):
    """fit refused to write a repair its checks judged useless or harmful: a user-facing error that also carries
    what the fit saw (``report``: the summary ``fit --json`` writes, with ``refused`` set), so ``--json`` can still
    be written (new-user run 25: a refusal left no JSON, when it is most needed)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


def suggest(name: str, candidates: list[str], limit: int = 8) -> str:
    """A short " (closest candidates: ...)" or " (candidates: ...)" suffix for a not-found message."""
    import difflib

    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.5)
    if close:
        return " (closest candidates: " + ", ".join(close) + ")"
    more = f", ... ({len(candidates)} in all)" if len(candidates) > limit else ""
    return " (candidates: " + ", ".join(candidates[:limit]) + more + ")" if candidates else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    wrapping third-party errors into a one-line FireError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
