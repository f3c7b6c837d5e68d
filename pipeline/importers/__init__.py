"""Bring pretrained autoencoders from other formats into latentpipe checkpoints.

``pipeline.importers.diffusers.import_diffusers`` turns a diffusers ``AutoencoderKL`` directory
into a checkpoint that ``latentpipe export`` and ``latentpipe encode`` use unchanged.
"""
