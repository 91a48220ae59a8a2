#!/usr/bin/env bash
# Sets up ipr-dist on a fresh Debian machine with Python 3.11: Debian packages when missing (needs
# root), a virtual environment in .venv, and the pinned Python dependencies (constraints.txt, torch
# 2.13.0 included). Idempotent: a second run checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "ipr-dist needs Python 3.11+"'

apt_missing=()
command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)            # HTML/Canvas games
command -v Xvfb >/dev/null 2>&1 || apt_missing+=(xvfb)                    # desktop games: virtual display
[ -x /usr/games/xmoto ] || apt_missing+=(xmoto)                             # shipped desktop games
[ -x /usr/games/neverball ] || apt_missing+=(neverball)
command -v cc >/dev/null 2>&1 || apt_missing+=(gcc libc6-dev)              # desktop games' virtual clock library
"$PYTHON" -m venv --help >/dev/null 2>&1 || apt_missing+=(python3-venv)
"$PYTHON" -c 'import ensurepip' >/dev/null 2>&1 || apt_missing+=(python3-venv)
if [ ${#apt_missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${apt_missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.ipr-setup-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies into .venv (pinned by constraints.txt)"
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  # Magnipy, the magnitude library tests/test_metrics.py checks the Curiosity metric against: its
  # metadata pins scipy==1.13.0 (numpy<2.3), so it goes in without its pins; its other imports are
  # in the test extra.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps magnipy==1.0.0
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv/bin/ipr)"
