"""Export a trained autoencoder's encoder to ONNX with a parity check and a JSON sidecar."""

from pipeline.export.job import ExportConfig, export_from_checkpoint, export_model
from pipeline.export.onnx_export import EncoderForExport, export_encoder_onnx
from pipeline.export.parity import (
    IndexParityError,
    ParityError,
    check_parity,
    compare_outputs,
    parity_report,
    spatial_parity_report,
)
from pipeline.export.sidecar import (
    SidecarError,
    build_sidecar,
    codebook_url,
    dynamic_spatial,
    file_sha256,
    index_dtype,
    latent_shape_for,
    load_sidecar,
    sidecar_path,
    write_sidecar,
)
from pipeline.export.stats import estimate_latent_stats

__all__ = [
    "EncoderForExport",
    "ExportConfig",
    "IndexParityError",
    "ParityError",
    "SidecarError",
    "build_sidecar",
    "check_parity",
    "codebook_url",
    "compare_outputs",
    "dynamic_spatial",
    "estimate_latent_stats",
    "export_encoder_onnx",
    "export_from_checkpoint",
    "export_model",
    "file_sha256",
    "index_dtype",
    "latent_shape_for",
    "load_sidecar",
    "parity_report",
    "sidecar_path",
    "spatial_parity_report",
    "write_sidecar",
]
