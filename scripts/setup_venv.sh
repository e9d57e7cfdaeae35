#!/usr/bin/env bash
# Create .venv and install the project into it (pip install -e ".[EXTRAS]"), with progress: a first-time install
# resolves ~120 packages and writes ~6.5 GB (torch + the CUDA libraries torchvision pins, from this machine's local
# wheel mirror), which takes 1.5-5 minutes during which pip itself says nothing for long stretches. Every 10 s this
# prints the phase (resolving: how many packages so far; installing: how much of the ~6 GB is written).
#
#   bash scripts/setup_venv.sh [EXTRAS]      # EXTRAS: train,serve,dev (default). pip's full log: .venv/pip-install.log
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
EXTRAS="${1:-train,serve,dev}"
EXPECTED_MB=6550  # measured size of .venv with the default extras (torch 2.14.1 + torchvision 0.29.1 stack)

[ -x .venv/bin/python ] || python3 -m venv .venv
LOG=.venv/pip-install.log
echo "   pip install -e \".[$EXTRAS]\" into .venv: ~120 packages, ~6.5 GB, usually 1.5-5 min (log: $LOG)"
.venv/bin/pip install --progress-bar off -e ".[$EXTRAS]" >"$LOG" 2>&1 &
PIP=$!
START=$SECONDS
while kill -0 "$PIP" 2>/dev/null; do
  sleep 10
  kill -0 "$PIP" 2>/dev/null || break
  resolved=$(grep -c "^Collecting\|^Requirement already satisfied" "$LOG" || true)
  elapsed="$(( (SECONDS - START) / 60 ))m$(( (SECONDS - START) % 60 ))s"
  if grep -q "^Installing collected packages" "$LOG"; then
    mb=$(du -sm .venv 2>/dev/null | cut -f1)
    n=$(grep "^Installing collected packages" "$LOG" | head -1 | tr ',' '\n' | wc -l)
    echo "   [$elapsed] installing $n packages: .venv holds ${mb} MB of ~${EXPECTED_MB} MB"
  else
    last=$(grep "^Collecting" "$LOG" | tail -1 | cut -d' ' -f2)
    echo "   [$elapsed] resolving and fetching: $resolved requirements so far${last:+ (now: $last)}"
  fi
done
if ! wait "$PIP"; then
  tail -n 30 "$LOG" >&2
  echo "error: pip install failed after $(( SECONDS - START )) s; the whole log is $LOG" >&2
  exit 1
fi
echo "   done in $(( SECONDS - START )) s: $(grep "^Successfully installed" "$LOG" | wc -w | awk '{print ($1 > 2 ? $1 - 2 : 0)}') packages installed"
