#!/usr/bin/env bash
# Create .venv and install difflora: what training and generating need (`bash scripts/setup.sh`), or also what the
# tests need (`bash scripts/setup.sh --tests`: the test extras, and Debian's Chromium for the web UI's browser test).
# torch is installed first as the CPU build on disk (torch==2.13.0); a bare `torch` would pull a multi-GB CUDA build.
# GPU users: install their torch into .venv first, then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
for argument in "$@"; do
  case "$argument" in
    --tests) tests=1 ;;
    *) echo "setup: unknown option $argument (use --tests to set up the test suite too)" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
if [ "$tests" = 0 ]; then
  python -m pip install -q -c scripts/constraints.txt -e ".[train]"
  exit 0
fi
python -m pip install -q -c scripts/constraints.txt -e ".[test]"
# The web UI's browser test drives Debian's Chromium with Playwright (which must not download a browser of its own).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: chromium could not be installed; the browser test will be skipped"
fi
