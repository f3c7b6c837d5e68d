"""``latentpipe verify``: check a finished latent corpus (see :mod:`pipeline.verify.job`)."""

from pipeline.verify.decode import decode_pixels, psnr_db
from pipeline.verify.job import VerifyConfig, verify_corpus

__all__ = ["VerifyConfig", "decode_pixels", "psnr_db", "verify_corpus"]
