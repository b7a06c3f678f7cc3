#!/usr/bin/env bash
# Runs the demo chat: builds what is missing, starts a relay and a static server, prints
# the URL to open (in two tabs, or on two machines on the same network with --host).
#   bash client-wasm/demo/run.sh            (or: cd client-wasm && npm run demo)
# Environment: WS_PORT (default 7070), HTTP_PORT (default 8080), HOST (default 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
WS_PORT=${WS_PORT:-7070}
HTTP_PORT=${HTTP_PORT:-8080}

[ -d node_modules ] || npm ci --no-audit --no-fund
[ -f pkg/whispeer_wasm_bg.wasm ] || npm run build

target=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')}
cargo build --release -p whispeer-relay --bin whispeer-relay
relay="$target/release/whispeer-relay"

ready=$(mktemp -d)
"$relay" serve --store memory --ws "$HOST:$WS_PORT" --tcp 127.0.0.1:0 --admin 127.0.0.1:0 --ready-file "$ready/ready.json" &
relay_pid=$!
node scripts/serve.mjs --host "$HOST" --port "$HTTP_PORT" > "$ready/http.json" &
http_pid=$!
trap 'kill $relay_pid $http_pid 2>/dev/null; rm -rf "$ready"' EXIT INT TERM

while [ ! -s "$ready/ready.json" ] || [ ! -s "$ready/http.json" ]; do
  kill -0 $relay_pid 2>/dev/null || { echo "relay failed to start (is port $WS_PORT free? set WS_PORT)"; exit 1; }
  kill -0 $http_pid 2>/dev/null || { echo "static server failed to start (is port $HTTP_PORT free? set HTTP_PORT)"; exit 1; }
  sleep 0.1
done
http=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1],"utf8")).url)' "$ready/http.json")
echo
echo "  whispeer demo chat:  $http/demo/?relay=ws://$HOST:$WS_PORT"
echo
echo "  Open it in two tabs, pick names, the same room and passphrase, and chat."
echo "  Ctrl-C stops the relay and the server."
wait
