"""Bring pretrained autoencoders from other formats in as latentpipe model artifacts.

``pipeline.importers.diffusers.import_diffusers`` turns a diffusers ``AutoencoderKL`` directory
into a model artifact that ``latentpipe export`` and ``latentpipe encode`` use unchanged.
"""
