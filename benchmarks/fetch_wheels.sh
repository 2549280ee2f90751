#!/usr/bin/env bash
# Download the peer libraries as wheels into .whl/ (git-ignored) so that gpu_check.sh can
# install them on a GPU machine that cannot reach PyPI. Carry .whl with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl normflows FrEIA
ls .whl
