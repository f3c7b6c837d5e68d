#!/bin/sh
# Install latentpipe with exactly the tested versions (constraints.txt), from the repository root.
#
# The one install procedure of the project: `make setup` runs it into .venv and deploy/Dockerfile
# runs it into the Ray image, so a laptop and a cluster get the same versions
# (tests/unit/test_deploy.py checks that both call it and that nothing else installs packages).
#
#   usage: sh deploy/install-pinned.sh PYTHON EXTRAS          e.g. .venv/bin/python dev,s3
#   TORCH_INDEX_URL  optional: the index torch comes from (the image: PyTorch's /whl/cpu or
#                    /whl/cu128); unset = pip's configured indexes.
set -eu
PY=$1
EXTRAS=$2
"$PY" -m pip install --quiet --upgrade pip
# torch first, pinned by constraints.txt: an unpinned resolve pulls PyPI's multi-GB CUDA build.
# An index's local build (2.13.0+cpu, 2.13.0+cu128) satisfies the pin torch==2.13.0.
"$PY" -m pip install --quiet -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
"$PY" -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
