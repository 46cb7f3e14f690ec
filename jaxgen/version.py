"""jaxgen's version, as installed (pyproject's), for `--version`, `/version` and logs."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("jaxgen")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
