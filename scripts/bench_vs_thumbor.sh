#!/usr/bin/env bash
# Side-by-side benchmark: ImageFleet's server against thumbor 7.8 on this machine,
# in one run, driven by the same aiohttp client (scripts/bench_vs_thumbor.py).
#
# thumbor pins Pillow < 13, so it lives in its own throwaway venv, kept in the user's
# cache folder between runs (delete it to start afresh; THUMBOR_VENV overrides).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
THUMBOR_VENV=${THUMBOR_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/imagefleet/thumbor-7.8-venv}

if [ ! -x "$THUMBOR_VENV/bin/thumbor" ]; then
    echo "installing thumbor 7.8 into $THUMBOR_VENV" >&2
    python3 -m venv "$THUMBOR_VENV"
    "$THUMBOR_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$THUMBOR_VENV/bin/python" -m pip install --quiet "thumbor==7.8.*"
fi
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    make -C "$ROOT" .venv/.installed
fi
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/bench_vs_thumbor.py" \
    --thumbor "$THUMBOR_VENV/bin/thumbor" "$@"
