#!/usr/bin/env bash
# Does `gradio app.py` (Gradio's hot reload) pick up an edit? Starts it in a throwaway clone of this repository's last
# commit (never in the checkout: the check edits a file), changes the page title in studio/ui/page.py and waits for
# the running server to serve the new title. Prints how long each stage took; exit code 0 when it reloaded.
#   evals/gradio_reload_check.sh [PORT]          (GRADIO=path/to/gradio to use another environment)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GRADIO=${GRADIO:-$ROOT/.venv/bin/gradio}
PORT=${1:-7931}
WORK=$(mktemp -d)
git clone -q "$ROOT" "$WORK/app" && cd "$WORK/app" || exit 1
"$GRADIO" app.py -- --port "$PORT" --library "$WORK/lib" --outputs "$WORK/out" >"$WORK/server.log" 2>&1 &
SERVER=$!
stop() { pkill -P "$SERVER" 2>/dev/null; kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$WORK"; }
trap stop EXIT
title() { curl -s "http://127.0.0.1:$PORT/config" | grep -o 'Troupe Studio[A-Z ]*' | head -1; }

for i in $(seq 1 600); do grep -q "Running on" "$WORK/server.log" && break; sleep 1; done
echo "served after ${i}s: '$(title)'"
# The watcher runs app.py once more in its own thread and only then records the files' times, so an edit made
# before that is not seen as a change: the edit is made, then touched again every 15 s until the watcher reports it.
sed -i 's/<\/span> Troupe Studio/<\/span> Troupe Studio RELOADED/' studio/ui/page.py
for i in $(seq 1 600); do
  grep -q "Changes detected" "$WORK/server.log" && break
  sleep 1
  [ $((i % 15)) = 0 ] && touch studio/ui/page.py
done
echo "edit seen after ${i}s"
for i in $(seq 1 300); do [ "$(title)" = "Troupe Studio RELOADED" ] && break; sleep 1; done
echo "new page served ${i}s later: '$(title)'"
grep -v '^\s*$' "$WORK/server.log" | tail -8
[ "$(title)" = "Troupe Studio RELOADED" ]
