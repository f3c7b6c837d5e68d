"""Errors shared by commands; this module imports nothing, so the CLI can catch them cheaply."""

from __future__ import annotations


class ResumableError(RuntimeError):
    """A run stopped part-way through; the message says how to resume it (usually: run the
    same command again). The CLI prints it as one line, without a traceback."""
