#!/usr/bin/env bash
# The test command (README): the whole suite, heavy architectures included.
set -euo pipefail
cd "$(dirname "$0")/.."
# Three workers on two cores (with two, the last full run kept the cores 79% busy: tests wait on
# subprocesses, servers and files), one test file each at a time (files share fixtures and run
# folders), the longest files first (tests/conftest.py: LONGEST_FIRST).
exec python -m pytest -q -p no:cacheprovider --timeout=1500 -n 3 --dist loadfile \
    --no-loadscope-reorder "$@"
