#!/usr/bin/env bash
# Two revisions back to back on this machine: the demo's figures for one seed, and the 1,000-device
# pruned fleet round (medians of REPEATS). Used for changes that must not move behaviour or speed.
#
#   benchmarks/compare_revisions.sh OLD NEW [OUT]     e.g. benchmarks/compare_revisions.sh 8a24328 HEAD
#
# Each revision is built as a wheel into its own folder and put first on PYTHONPATH, so the checkout
# and its .venv (scripts/setup.sh) are left as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: compare_revisions.sh OLD NEW [OUT]}
new=${2:?usage: compare_revisions.sh OLD NEW [OUT]}
out=${3:-/tmp/fedprune-compare}
repeats=${REPEATS:-3}
python=$PWD/.venv/bin/python
rm -rf "$out" && mkdir -p "$out"

for side in old new; do
  rev=${!side}
  git worktree add -q --detach "$out/$side/tree" "$rev"
  "$python" -m pip install -q --no-deps --target "$out/$side/site" "$out/$side/tree" >/dev/null
  # From $out, not the checkout: "python -m" puts the working folder first on sys.path, and the
  # checkout's fedprune/ would win over the revision's.
  where=$(cd "$out" && PYTHONPATH=$out/$side/site "$python" -c \
    'import fedprune.coordinator.rounds as r; print(r.__file__)')
  [[ $where == "$out/$side/site/"* ]] || { echo "$side: imports $where, not its own" >&2; exit 1; }
  (cd "$out" && PYTHONPATH=$out/$side/site "$python" -m fedprune.coordinator.demo --seed 3 \
    --out "$out/$side/demo" --run ab) >"$out/demo-$side.log" 2>&1
done
# The fleet runs alternate (old, new, old, new, ...) so that a machine that slows down or speeds
# up during the comparison weighs on both sides alike.
for i in $(seq "$repeats"); do
  for side in old new; do
    (cd "$out" && PYTHONPATH=$out/$side/site "$python" "$out/$side/tree/benchmarks/fleet.py" \
      --devices 1000 --updates pruned --no-deadline --json "$out/fleet-$side-$i.json") \
      >"$out/fleet-$side-$i.log" 2>&1
  done
done
for side in old new; do git worktree remove --force "$out/$side/tree"; done

# The demo's rounds and exports must match line for line once timings and paths are set aside.
strip() { sed -E -e "s#$out/(old|new)#OUT#g" -e 's/[0-9.]+ ?s(: [0-9]+ rounds)?$/\1/' -e 's/127\.0\.0\.1:[0-9]+/BROKER/' "$1"; }
if diff <(strip "$out/demo-old.log") <(strip "$out/demo-new.log") >"$out/demo.diff"; then
  echo "demo: same figures ($(grep -c '^round' "$out/demo-new.log") rounds, exports alike)"
else
  echo "demo: figures differ, see $out/demo.diff"
fi
"$python" - "$out" "$repeats" <<'EOF'
import json, statistics, sys
out, repeats = sys.argv[1], int(sys.argv[2])
medians = {}
for side in ("old", "new"):
    rows = [json.load(open(f"{out}/fleet-{side}-{i}.json"))["rows"][0] for i in range(1, repeats + 1)]
    medians[side] = {k: statistics.median(r[k] for r in rows) for k in ("round_s", "cpu_ms_per_update")}
    once = all(r["exactly_once"] == "yes" for r in rows)
    print(f"fleet {side}: round {medians[side]['round_s']:.2f} s, coordinator CPU "
          f"{medians[side]['cpu_ms_per_update']:.2f} ms/update, exactly once {once} "
          f"(runs {', '.join(format(r['round_s'], '.2f') for r in rows)})")
for key in ("round_s", "cpu_ms_per_update"):
    print(f"new/old {key}: {medians['new'][key] / medians['old'][key]:.2f}")
EOF
