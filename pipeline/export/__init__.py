"""Export a trained autoencoder's encoder to ONNX with a parity check and a JSON sidecar.

The sidecar itself is a contract of :mod:`pipeline.contracts.sidecar`; its names are re-exported
here for users who import them from export.
"""

from pipeline.contracts.sidecar import (
    Sidecar,
    SidecarError,
    build_sidecar,
    file_sha256,
    index_dtype,
    load_sidecar,
    sidecar_path,
    write_sidecar,
)
from pipeline.export.job import ExportConfig, export_from_artifact, export_model
from pipeline.export.onnx_export import EncoderForExport, VQEncoderForExport, export_encoder_onnx
from pipeline.export.parity import (
    IndexParityError,
    ParityError,
    check_parity,
    compare_outputs,
    parity_report,
    spatial_parity_report,
)
from pipeline.export.stats import estimate_latent_stats

__all__ = [
    "EncoderForExport",
    "ExportConfig",
    "IndexParityError",
    "ParityError",
    "Sidecar",
    "SidecarError",
    "build_sidecar",
    "check_parity",
    "compare_outputs",
    "estimate_latent_stats",
    "export_encoder_onnx",
    "export_from_artifact",
    "export_model",
    "file_sha256",
    "index_dtype",
    "load_sidecar",
    "parity_report",
    "sidecar_path",
    "spatial_parity_report",
    "VQEncoderForExport",
    "write_sidecar",
]
