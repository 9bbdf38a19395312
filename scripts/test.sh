#!/usr/bin/env bash
# The test command (README): the whole suite, heavy architectures included, on two workers.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two workers, one test file each at a time (files share fixtures and run folders).
exec python -m pytest -q -p no:cacheprovider --timeout=1500 -n 2 --dist loadfile "$@"
