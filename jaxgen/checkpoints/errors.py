"""The one error type user-fixable checkpoint problems raise (the CLI prints it, no traceback)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, of an unknown architecture or has a bad tensor."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`e`'s message on one line, cut to `limit` characters (libraries under the loaders raise
    messages of many lines, e.g. a whole TensorStore spec)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "…"
