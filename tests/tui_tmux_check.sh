#!/usr/bin/env bash
# Starts `compass-monitor tui` on a stored run in a real terminal (tmux), and checks that the screen
# shows the run's numbers as the reader computes them; then quits with `q`.
#   tests/tui_tmux_check.sh [PYTHON]      (terminal size: COLS x ROWS, default 100 x 30; NO_COLOR and TERM pass through)
# Exit 0: pass; 1: fail (the captured screen is printed); 77: skipped (no tmux).
set -euo pipefail
PY="${1:-${PYTHON:-.venv/bin/python}}"
if ! command -v tmux >/dev/null 2>&1; then
    echo "SKIP: tmux is not installed (apt-get install -y tmux)"
    exit 77
fi
WORK="$(mktemp -d)"
SESSION="compass-tui-check-$$"
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true; rm -rf "$WORK"' EXIT

# A stored run and the numbers the screen must show (from the reader, not from the TUI).
COLS="${COLS:-100}"
ROWS="${ROWS:-30}"
HERE="$(cd "$(dirname "$0")" && pwd)"
"$PY" - "$WORK/run" "$HERE" > "$WORK/expected" <<'PYEOF'
import sys
from compass_monitor import open_run
from compass_monitor.aggregates import everything_linear, group_stats
sys.path.insert(0, sys.argv[2])
from synthetic_runs import write_synthetic_run
path = write_synthetic_run(sys.argv[1], snapshots=7, seed=5)
run = open_run(path)
sparsity = group_stats(run, everything_linear)["all linear"].sparsity[-1]
first = run.params[0]
density = run.count("changed")[-1, 0] / first.numel
print(f"step {int(run.steps[-1])} (7/7)")
print(f"global sparsity {sparsity:.3f}")
print(f"changed |M|/n  {density:.3f}")
print("FINISHED")
print("L1 down")
PYEOF

ENVS="TERM=${TERM:-xterm-256color}${NO_COLOR+ NO_COLOR=$NO_COLOR}"
tmux new-session -d -s "$SESSION" -x "$COLS" -y "$ROWS" "env $ENVS '$PY' -m compass_monitor.cli tui '$WORK/run'; echo EXITED \$?; sleep 5"
screen=""
for _ in $(seq 1 100); do
    screen="$(tmux capture-pane -p -t "$SESSION")"
    if grep -q "global sparsity" <<<"$screen"; then break; fi
    sleep 0.2
done
sleep 0.5
screen="$(tmux capture-pane -p -t "$SESSION")"
status=0
while IFS= read -r want; do
    if ! grep -qF -- "$want" <<<"$screen"; then
        echo "FAIL: the screen does not show '$want'"
        status=1
    fi
done < "$WORK/expected"
tmux send-keys -t "$SESSION" q
for _ in $(seq 1 50); do
    if grep -q EXITED <<<"$(tmux capture-pane -p -t "$SESSION")"; then break; fi
    sleep 0.1
done
final="$(tmux capture-pane -p -t "$SESSION")"
if ! grep -q EXITED <<<"$final"; then
    echo "FAIL: q did not quit the app"
    status=1
elif ! grep -q "EXITED 0" <<<"$final"; then
    echo "FAIL: the app exited with a non-zero status: $(grep EXITED <<<"$final")"
    status=1
fi
if [ "$status" -ne 0 ]; then
    echo "---- screen ----"
    echo "$screen"
    exit 1
fi
echo "OK (${COLS}x${ROWS}, $ENVS): the TUI showed $(paste -sd ';' "$WORK/expected") in a real terminal and quit on q"
