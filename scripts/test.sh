#!/usr/bin/env bash
# Set up a fresh machine and run the test suite: a virtual environment in .venv with
# tagger, its test tools and the train extra (Keras/TensorFlow: the tests train tiny
# models and check the ONNX export against Keras), the beets extra (the beets plugin's
# tests), the ray extra (tests/test_ray.py runs a two-node Ray cluster on 127.0.0.1) and
# musicnn's weights, then pytest. ffmpeg (Debian package) is needed by the
# tests that convert audio; they skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q '.[test,train,beets,ray]'
# The pretrained teacher's weights (tests/test_teacher.py); never let pip resolve its
# dependencies: its metadata pins numpy < 1.17.
.venv/bin/python -m pip install -q --no-deps musicnn==0.1.0
.venv/bin/python -m pytest "$@"
