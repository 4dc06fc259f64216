#!/usr/bin/env bash
# Installs what the demo and the tests need from Debian/Ubuntu packages: VictoriaMetrics (an
# InfluxDB v2 write API), InfluxDB 1.x (v1 write API, InfluxQL) and mosquitto. Skips what is
# already there. Nothing is started here: the demo and the test harness start their own servers.
set -euo pipefail

need=()
command -v victoria-metrics >/dev/null 2>&1 || [ -x /usr/bin/victoria-metrics ] || need+=(victoria-metrics)
command -v influxd >/dev/null 2>&1 || [ -x /usr/bin/influxd ] || need+=(influxdb influxdb-client)
[ -x /usr/sbin/mosquitto ] || need+=(mosquitto mosquitto-clients)
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v openssl >/dev/null 2>&1 || need+=(openssl)

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi
