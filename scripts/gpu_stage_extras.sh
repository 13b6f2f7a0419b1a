#!/usr/bin/env bash
# After ../shared/gpu-kit/stage.sh: the wheels the GPU image lacks that the kit does not carry, which the
# trial needs (datasets, for every data source, and its dill and multiprocess), into .gpu/extras/ (git-
# ignored, .gitignore). scripts/gpu_check.sh installs them on the GPU machine. ~100 KB..1 MB, seconds.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .gpu/extras && mkdir -p .gpu/extras
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/extras datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .gpu/extras
