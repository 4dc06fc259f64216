#!/usr/bin/env bash
# The main job, on one machine: a local sink (VictoriaMetrics, or the InfluxDB you point
# GATEWAY_SINK__URL at), the gateway with its embedded MQTT broker, and a fleet of simulated
# devices; then a summary of what landed.
#
#   DEVICES=200 MESSAGES=100 ./scripts/demo.sh
#
# Everything it starts is stopped when it ends. Data lives in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh

DEVICES=${DEVICES:-100}
MESSAGES=${MESSAGES:-100}
READINGS=${READINGS:-10}
MQTT_PORT=${MQTT_PORT:-1883}
ADMIN=${ADMIN:-127.0.0.1:9184}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "building (release)..." >&2
cargo build --locked --release -q -p gateway -p simulator

if [ -z "${GATEWAY_SINK__URL:-}" ]; then
  vm_port=${VM_PORT:-8428}
  victoria-metrics -httpListenAddr="127.0.0.1:$vm_port" -storageDataPath="$work/vm" \
    -retentionPeriod=1d -search.latencyOffset=0s >"$work/vm.log" 2>&1 &
  pids+=($!)
  export GATEWAY_SINK__URL="http://127.0.0.1:$vm_port"
  verify=(--verify-vm "$GATEWAY_SINK__URL")
  for _ in $(seq 50); do curl -fsS "$GATEWAY_SINK__URL/health" >/dev/null 2>&1 && break; sleep 0.2; done
  echo "sink: VictoriaMetrics at $GATEWAY_SINK__URL (data in $work/vm)" >&2
else
  verify=()
  echo "sink: $GATEWAY_SINK__URL (your own; the simulator will not verify it)" >&2
fi

# The demo lets any device connect (auth.anonymous), on loopback only; see docs/security.md.
echo "gateway: anonymous devices allowed (demo only; production configs use auth.credentials_file)" >&2
GATEWAY_MQTT__LISTEN="127.0.0.1:$MQTT_PORT" GATEWAY_MQTT__LISTEN_V5="127.0.0.1:$((MQTT_PORT + 1))" \
  GATEWAY_AUTH__ANONYMOUS="${GATEWAY_AUTH__ANONYMOUS:-true}" GATEWAY_ADMIN__LISTEN="$ADMIN" GATEWAY_DLQ__DIR="$work/dlq" GATEWAY_WAL__DIR="$work/wal" \
  ./target/release/gateway run >"$work/gateway.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")
for _ in $(seq 50); do curl -fsS "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
echo "gateway: MQTT on 127.0.0.1:$MQTT_PORT, metrics on http://$ADMIN/metrics" >&2

status=0
./target/release/simulator run --port "$MQTT_PORT" --devices "$DEVICES" --messages "$MESSAGES" \
  --readings-per-message "$READINGS" --format mixed "${verify[@]}" || status=$?

echo
echo "gateway counters:"
curl -fsS "http://$ADMIN/metrics" | grep -E '^gateway_(messages_received|readings_accepted|readings_rejected|sink_readings_written|dlq_readings|dlq_records|broker_dropped|queue_readings|readings_in_flight)' || true
kill -TERM "$gateway_pid" 2>/dev/null || true
wait "$gateway_pid" 2>/dev/null || true
echo
grep -E '"?stopped' "$work/gateway.log" | tail -n 1 || true
exit "$status"
