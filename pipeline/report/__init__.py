"""Run report: pictures of a trained model (reconstructions, prior samples, interpolation,
latent traversal; latent scatter and manifold for a 2-D latent) and ``report.json``.

Entry point: ``make_report(ReportConfig(run=...))``; see `pipeline.report.job`.
"""

from pipeline.report.job import ReportConfig, make_report

__all__ = ["ReportConfig", "make_report"]
