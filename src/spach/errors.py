"""User-facing errors: one clear line naming the problem and the fix; the CLI prints it without a traceback."""
from spach.text import escape


class SpachError(Exception):
    """A mistake in user input (name, file, config, data). Its message is one line."""


class CheckpointError(SpachError):
    """A checkpoint that cannot be read, or that belongs to another model."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line (a worker's re-raised error: its last
    line, without the 'SomeError: ' prefix), or its type name when it has no message; control and
    bidi characters escaped (`spach.text`), as the line may reach a terminal or a report."""
    msg = str(e).strip()
    if not msg:
        return type(e).__name__
    lines = msg.splitlines()
    if len(lines) > 1 and lines[-1].split(": ", 1)[0].endswith("Error"):  # a re-raised traceback
        return escape(lines[-1].split(": ", 1)[1])
    return escape(lines[0])
