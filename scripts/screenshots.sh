#!/usr/bin/env bash
# Remake the README's pictures of a live run: docs/images/dashboard.png (the web dashboard in headless
# chromium) and docs/images/monitor.svg (fedprune-monitor's terminal view), from a demo run on a private
# mosquitto, taken at round 6 while the run goes. Needs scripts/setup.sh done and chromium installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/images
mkdir -p "$out"
work=$(mktemp -d)
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker_port=$(free_port); web_port=$(free_port)
/usr/sbin/mosquitto -p "$broker_port" >"$work/mosquitto.log" 2>&1 &
broker=$!
trap 'kill $broker $demo 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 0.5
.venv/bin/fedprune-demo --broker "mqtt://127.0.0.1:$broker_port" --run lab --out "$work/runs" \
  --local-epochs 60 --dashboard "127.0.0.1:$web_port" >"$work/demo.log" 2>&1 &
demo=$!
# Wait until round 6 is being trained (or say why not).
.venv/bin/python - "$web_port" "$demo" <<'PY' || { echo "screenshots: the demo ended early; see $work/demo.log" >&2; exit 1; }
import json, os, sys, time, urllib.request
port, demo = sys.argv[1], int(sys.argv[2])
while True:
    try:
        os.kill(demo, 0)
    except OSError:
        sys.exit(1)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/snapshot.json", timeout=2) as r:
            run = json.load(r)["run"]
        if run["round"] >= 6 and run["phase"] == "training":
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.3)
PY
chromium --headless --no-sandbox --disable-gpu --timeout=5000 --window-size=1400,1200 \
  --screenshot="$out/dashboard.png" "http://127.0.0.1:$web_port/" 2>/dev/null
.venv/bin/fedprune-monitor --broker "mqtt://127.0.0.1:$broker_port" --run lab --once \
  --svg "$out/monitor.svg" >/dev/null
wait $demo
echo "screenshots: $out/dashboard.png $out/monitor.svg"
