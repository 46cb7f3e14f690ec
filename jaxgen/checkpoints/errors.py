"""The one error type user-fixable checkpoint problems raise (the CLI prints it, no traceback)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, of an unknown architecture or has a bad tensor."""
