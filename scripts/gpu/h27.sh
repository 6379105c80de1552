#!/usr/bin/env bash
# Lead: the engine's CUDA-graph decode across changing batch shapes (the GRPO loop's pattern). 1 GPU, <= 90 s.
cd "$(dirname "$0")/../.."
timeout 90 python3 -m pytest -m gpu tests/gpu/test_engine_graphs.py -q -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/h27.log
