"""User-facing errors: one clear line naming the problem and the fix; the CLI prints it without a traceback."""


class SpachError(Exception):
    """A mistake in user input (name, file, config, data). Its message is one line."""


class CheckpointError(SpachError):
    """A checkpoint that cannot be read, or that belongs to another model."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line (a worker's re-raised error: its last
    line, without the 'SomeError: ' prefix), or its type name when it has no message."""
    msg = str(e).strip()
    if not msg:
        return type(e).__name__
    lines = msg.splitlines()
    if len(lines) > 1 and lines[-1].split(": ", 1)[0].endswith("Error"):  # a re-raised traceback
        return lines[-1].split(": ", 1)[1]
    return lines[0]


def one_line(text: object, limit: int = 200) -> str:
    """`text` fit for a one-line message: runs of whitespace (newlines too) as one space, any other
    control character escaped (words from a server or a file never drive the terminal), and at most
    `limit` characters."""
    s = " ".join(str(text).split())
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s if len(s) <= limit else s[: limit - 1] + "…"
