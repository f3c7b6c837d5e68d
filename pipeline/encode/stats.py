"""Moved to :mod:`pipeline.latents.stats` (kept until the encode rewrite drops this import)."""

from pipeline.latents.stats import ChannelStats, CodeUsage  # noqa: F401
