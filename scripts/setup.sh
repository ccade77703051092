#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of torch and this package.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first, pinned: this version's CPU build is what the project is tested with, and asking pip for an
# unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# dev: the test tools; demo: the attention explorer's Gradio and plotly (the package itself needs neither).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,demo]"
# Debian's Chromium, which Playwright drives in tests/test_demo_browser.py (`playwright install` would download a
# browser: never run here). Installed where it is missing and this can (root, apt-get); otherwise the test is skipped.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt_install() {
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1
        }
        apt_install || { apt-get update -qq >/dev/null 2>&1 && apt_install; } || true  # update only if needed
    fi
    [ -x /usr/bin/chromium ] \
        || echo "setup.sh: no Chromium (installing it needs root and apt-get): the browser test will be skipped."
fi
# The oldest transformers the package declares, in a folder of its own beside the newest that pip just installed:
# tests/test_transformers_range.py runs the generation tests (which override private beam-search helpers) on it too,
# so both ends of the declared range are tested.
oldest=$(.venv/bin/python scripts/oldest_transformers.py)
if [ "$(cat .venv/transformers-oldest/VERSION 2>/dev/null)" != "$oldest" ]; then
    rm -rf .venv/transformers-oldest
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        --target .venv/transformers-oldest "transformers==$oldest"
    echo "$oldest" > .venv/transformers-oldest/VERSION
fi
