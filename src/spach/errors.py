"""User-facing errors: one clear line naming the problem and the fix; the CLI prints it without a traceback."""


class SpachError(Exception):
    """A mistake in user input (name, file, config, data). Its message is one line."""


class CheckpointError(SpachError):
    """A checkpoint that cannot be read, or that belongs to another model."""
