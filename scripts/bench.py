#!/usr/bin/env python3
"""End-to-end benchmark: the sink's own rate, then the gateway at rising rates, then scale.

Run through scripts/bench.sh, which builds the release binaries first. Everything runs on this
machine, on loopback: VictoriaMetrics (the sink), mosquitto (external mode), the gateway, and
the simulator as the publishers. Prints a table and writes the figures as JSON (--out).

What each figure means:
- raw sink rate: the same kind of line protocol the gateway writes, posted straight to the
  sink with the gateway's batch size (5,000 lines) and concurrency (4 requests in flight).
- modes: embedded (the default: the guard takes telemetry in and PUBACKs once it is in the
  write-ahead log and synced, `ingest.ack = "durable"`), received (the same with
  `ingest.ack = "received"`: PUBACK once queued, in memory), external (a shared subscription
  on mosquitto).
- a step: a fresh gateway; the simulator publishes `rate` messages/s (QoS 1) from `devices`
  devices for `secs` seconds; the step ends when the sink holds every reading of the step.
  delivered readings/s = readings / (first publish .. the sink's acknowledgement of the last
  one), the same measure as the raw rate; that every reading is then in the sink is checked
  with a count query after each ramp (VictoriaMetrics makes samples searchable much more
  slowly than it acknowledges them: about 100,000 a second here).
  gateway CPU = user + system CPU seconds of the gateway process over the step (the embedded
  broker runs inside it), per million readings and per message.
  peak RSS = the gateway's VmHWM at the end of the step.
  PUBACK latency = the simulator's time from each PUBLISH leaving to its PUBACK.
  log syncs/s and log bytes/s = the write-ahead log's fdatasyncs and bytes written over the
  step (durable only).
- saturation: the first step whose publishers could not publish 90% of the offered rate
  (push back), or whose readings took more than 3 s after the last publish to land (the sink
  side fell behind), or that lost anything; stepping stops there. delivered readings/s counts
  the drain, so it reads about 10% under the offered rate at 10-second steps even when the
  gateway keeps up.
- latency: a run at half the highest rate delivered, with the simulator polling the sink
  every 100 ms: p50/p99 from publish to visible in the sink (resolution: the poll; at high
  rates this is the sink's visibility lag), and the gateway's own histogram from receiving a
  message to the sink's acknowledgement (bucket bounds: 5 ms × 2^k).
- overload: external mode when the broker delivers far faster than the sink takes (mosquitto
  with no in-flight limit, the sink held to 200,000 readings/s by the test suite's fault
  proxy): three bursts of 120,000 messages of 100 readings on one gateway, each drained
  before the next; per burst the peak and drained RSS and the peaks of the unacknowledged
  messages and of the acknowledgements due; at the end, every reading counted in the sink.
- scale: N devices connected at 1 message a minute; RSS per connection = (RSS with the fleet
  connected - RSS before) / N.
"""

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BENCH_GATEWAY: another build of the gateway to measure, e.g. an earlier commit beside this one.
GATEWAY = os.environ.get("BENCH_GATEWAY") or os.path.join(ROOT, "target/release/gateway")
SIMULATOR = os.path.join(ROOT, "target/release/simulator")
FAULT_PROXY = os.path.join(ROOT, "target/release/fault-proxy")
TICK = os.sysconf("SC_CLK_TCK")
# Settings given with --env, for every gateway the run starts.
EXTRA_ENV = {}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer within {timeout}s")


def wait_tcp(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on port {port} after {timeout}s")


def start_mosquitto(work, name, max_inflight):
    """mosquitto on a free port, queueing without limit, with this many messages in flight to
    each subscriber (0: no limit)."""
    port = free_port()
    conf = f"{work}/mosquitto-{name}.conf"
    with open(conf, "w") as f:
        f.write(
            f"per_listener_settings true\nuser root\nmax_queued_messages 0\nmax_queued_bytes 0\n"
            f"max_inflight_messages {max_inflight}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        )
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or sys.exit("mosquitto is missing: ./scripts/install-deps.sh"), "-c", conf],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_tcp(port)
    return proc, port


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the line; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class VictoriaMetrics:
    def __init__(self, work):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                shutil.which("victoria-metrics") or sys.exit("victoria-metrics is missing: ./scripts/install-deps.sh"),
                f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={work}/vm",
                "-retentionPeriod=100y",
                "-search.latencyOffset=0s",
                "-search.disableCache",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/health")

    def count(self, run):
        """Samples of field `value` with tag run=`run` (one per reading)."""
        urllib.request.urlopen(urllib.request.Request(self.url + "/internal/force_flush", method="POST")).read()
        q = f'sum(count_over_time(env_value{{run="{run}"}}[30d]))'
        body = urllib.request.urlopen(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": q})).read()
        result = json.loads(body)["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def raw_sink_rate(vm, lines_total, batch, concurrency):
    """Posts pre-built line protocol straight to the sink's v2 write API."""
    now_ns = time.time_ns() - 3600 * 10**9
    bodies = []
    for b in range(lines_total // batch):
        lines = []
        for i in range(batch):
            n = b * batch + i
            device = f"dev-{n % 1000 + 1:05}"
            lines.append(f"env,device={device},run=raw value={n * 0.5},seq={n} {now_ns + n * 1000}")
        bodies.append(("\n".join(lines) + "\n").encode())
    queue = list(range(len(bodies)))
    lock = threading.Lock()
    errors = []

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", vm.port, timeout=60)
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            conn.request("POST", "/api/v2/write?org=o&bucket=b&precision=ns", body=bodies[i])
            r = conn.getresponse()
            r.read()
            if r.status >= 300:
                errors.append(r.status)

    started, sink_cpu0 = time.time(), cpu_secs(vm.proc.pid)
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Writes are acknowledged before they are searchable; the rate counts acceptance.
    elapsed = time.time() - started
    if errors:
        sys.exit(f"the sink refused {len(errors)} raw batches: {errors[:3]}")
    return len(bodies) * batch / elapsed, (cpu_secs(vm.proc.pid) - sink_cpu0) / elapsed


class Gateway:
    def __init__(self, work, sink_url, mode, mqtt_url=None, extra=None):
        self.admin = f"127.0.0.1:{free_port()}"
        self.port, self.port5 = free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GATEWAY_MQTT__LISTEN": f"127.0.0.1:{self.port}",
            "GATEWAY_MQTT__LISTEN_V5": f"127.0.0.1:{self.port5}",
            "GATEWAY_ADMIN__LISTEN": self.admin,
            "GATEWAY_SINK__URL": sink_url,
            "GATEWAY_AUTH__ANONYMOUS": "true",
            "GATEWAY_SELF_METRICS__ENABLED": "false",
            "GATEWAY_LOG__LEVEL": "warn",
        }
        d = tempfile.mkdtemp(dir=work)
        env["GATEWAY_DLQ__DIR"] = f"{d}/dlq"
        env["GATEWAY_WAL__DIR"] = f"{d}/wal"
        if mode == "received":
            env["GATEWAY_INGEST__ACK"] = "received"
        if mode == "external":
            env.update(
                {
                    "GATEWAY_MQTT__MODE": "external",
                    "GATEWAY_MQTT__URL": mqtt_url,
                    # A fresh replica for each step whose session ends with it: a session
                    # kept across steps would carry one step's backlog into the next, and a
                    # new id per step with kept sessions would leave offline members in the
                    # group, which mosquitto keeps handing their share.
                    "GATEWAY_MQTT__CLIENT_ID": f"bench-{os.path.basename(d)}",
                    "GATEWAY_MQTT__SESSION_EXPIRY": "0s",
                }
            )
        env.update(EXTRA_ENV)
        env.update(extra or {})
        self.log = open(f"{d}/gateway.log", "w")
        self.proc = subprocess.Popen([GATEWAY, "run"], env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        wait_http(f"http://{self.admin}/healthz")
        deadline = time.time() + 20
        while self.metric("gateway_ingest_up") != 1.0:
            if time.time() > deadline:
                sys.exit("the gateway's ingest did not come up; see " + self.log.name)
            time.sleep(0.1)
        if mode != "external":
            wait_tcp(self.port)
        time.sleep(0.5)

    def metric(self, name):
        try:
            text = urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=2).read().decode()
        except Exception:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def simulate(port, run, devices, rate, secs, per_msg, report, verify_url=None, extra=()):
    args = [
        SIMULATOR, "run",
        "--port", str(port),
        "--devices", str(devices),
        "--rate", f"{rate / devices:.4f}",
        "--duration", f"{secs}s",
        "--readings-per-message", str(per_msg),
        "--format", "cbor",
        "--run-id", run,
        "--connect-rate", "0",
        "--report", report,
        *extra,
    ]
    if verify_url:
        args += ["--verify-vm", verify_url, "--poll-interval", "100ms"]
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(report) as f:
        return json.load(f)


def lag_percentiles(gw):
    """p50/p99 of the gateway's own receive-to-sink-acknowledgement histogram (bucket bounds)."""
    try:
        text = urllib.request.urlopen(f"http://{gw.admin}/metrics", timeout=2).read().decode()
    except Exception:
        return None, None
    buckets = []
    for line in text.splitlines():
        if line.startswith("gateway_end_to_end_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return None, None
    total = buckets[-1][1]
    at = lambda q: next(le for le, n in buckets if n >= q * total) * 1000
    return at(0.5), at(0.99)


def step(work, vm, mode, mqtt_url, per_msg, rate, devices, secs, seq, verify=False):
    gw = Gateway(work, vm.url, mode, mqtt_url)
    port = int(mqtt_url.rsplit(":", 1)[1]) if mode == "external" else gw.port
    run = f"{mode}-{per_msg}-{rate}-{seq}"
    cpu0, sink_cpu0 = cpu_secs(gw.proc.pid), cpu_secs(vm.proc.pid)
    syncs0 = gw.metric("gateway_wal_syncs_total") or 0
    log_bytes0 = gw.metric("gateway_wal_written_bytes_total") or 0
    report = simulate(port, run, devices, rate, secs, per_msg, f"{work}/{run}.json", vm.url if verify else None)
    expected = report["readings_sent"]
    published = time.time()
    # Delivered = acknowledged by the sink (2xx), as the raw rate is measured. What the sink
    # then makes searchable is checked separately (`check_landed`): VictoriaMetrics makes
    # samples visible to queries far more slowly than it acknowledges them.
    deadline = time.time() + 300
    while time.time() < deadline:
        written = gw.metric("gateway_sink_readings_written_total") or 0
        if written >= expected:
            break
        time.sleep(0.05)
    drain = time.time() - published
    elapsed = report["elapsed_secs"] + drain
    cpu = cpu_secs(gw.proc.pid) - cpu0
    sink_cpu = cpu_secs(vm.proc.pid) - sink_cpu0
    peak = status_kib(gw.proc.pid, "VmHWM")
    written = gw.metric("gateway_sink_readings_written_total") or 0
    syncs = (gw.metric("gateway_wal_syncs_total") or 0) - syncs0
    log_bytes = (gw.metric("gateway_wal_written_bytes_total") or 0) - log_bytes0
    lag50, lag99 = lag_percentiles(gw)
    gw.stop()
    out = {
        "mode": mode,
        "run": run,
        "readings_per_message": per_msg,
        "offered_messages_per_sec": rate,
        "published_messages_per_sec": report["messages_per_sec"],
        "readings": expected,
        "written": written,
        # Time after the last publish until the sink had acknowledged everything: about the
        # linger while the gateway keeps up, growing once it falls behind.
        "drain_secs": drain,
        "delivered_readings_per_sec": written / elapsed,
        "delivered_messages_per_sec": written / per_msg / elapsed,
        "gateway_cpu_secs": cpu,
        "cpu_secs_per_million_readings": cpu / max(written, 1) * 1e6,
        "cpu_us_per_message": cpu / max(written / per_msg, 1) * 1e6,
        "peak_rss_mib": peak / 1024,
        # Where the machine's two cores went during the step.
        "cores_gateway": cpu / elapsed,
        "cores_sink": sink_cpu / elapsed,
        "cores_publishers": (report.get("cpu_secs") or 0) / elapsed,
        "gateway_lag_p50_ms": lag50,
        "gateway_lag_p99_ms": lag99,
        "log_syncs_per_sec": syncs / elapsed,
        "log_mib_per_sec": log_bytes / elapsed / 2**20,
    }
    ack = report.get("ack_latency") or {}
    out["puback_p50_ms"] = ack.get("p50_ms")
    out["puback_p99_ms"] = ack.get("p99_ms")
    verification = report.get("verification") or {}
    latency = verification.get("latency")
    if latency:
        out["latency_p50_ms"] = latency.get("p50_ms")
        out["latency_p99_ms"] = latency.get("p99_ms")
    return out


def check_landed(vm, steps, timeout=300):
    """Waits until the sink shows every reading it acknowledged; sets `lost` on each step:
    published readings not in the sink (dropped by the broker, or lost after the write)."""
    deadline = time.time() + timeout
    for r in steps:
        seen = vm.count(r["run"])
        while seen < r["written"] and time.time() < deadline:
            time.sleep(1)
            seen = vm.count(r["run"])
        r["in_sink"] = seen
        r["lost"] = r["readings"] - seen


def ramp(work, vm, mode, mqtt_url, per_msg, rates, devices, secs):
    results = []
    for i, rate in enumerate(rates):
        r = step(work, vm, mode, mqtt_url, per_msg, rate, devices, secs, i)
        results.append(r)
        print(
            f"  {mode:8} {per_msg:3}/msg offered {rate:>7} msg/s: published {r['published_messages_per_sec']:>9.0f} msg/s, "
            f"delivered {r['delivered_readings_per_sec']:>9.0f} readings/s, CPU {r['cpu_us_per_message']:6.2f} us/msg "
            f"{r['cpu_secs_per_million_readings']:6.2f} s/M readings, drain {r['drain_secs']:.1f} s, "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, gateway lag p99 {r['gateway_lag_p99_ms']} ms, "
            f"PUBACK p50 {r['puback_p50_ms']} p99 {r['puback_p99_ms']} ms, log {r['log_syncs_per_sec']:.0f} syncs/s "
            f"{r['log_mib_per_sec']:.1f} MiB/s, cores: gateway {r['cores_gateway']:.2f} "
            f"sink {r['cores_sink']:.2f} publishers {r['cores_publishers']:.2f}",
            flush=True,
        )
        # Saturated: the publishers were held back (the gateway pushes back), or the writes
        # fell behind (the sink acknowledged the last reading more than 3 s after the last
        # publish).
        if r["published_messages_per_sec"] < 0.9 * rate or r["drain_secs"] > 3:
            break
    best = max(results, key=lambda r: r["delivered_readings_per_sec"])
    half = max(1, int(best["delivered_messages_per_sec"] / 2))
    lat = step(work, vm, mode, mqtt_url, per_msg, half, devices, secs, "lat", verify=True)
    check_landed(vm, results + [lat])
    print(
        f"  {mode:8} {per_msg:3}/msg latency at {half} msg/s (half the best): publish to visible in the sink "
        f"p50 {lat.get('latency_p50_ms')} ms, p99 {lat.get('latency_p99_ms')} ms; the gateway's receive to "
        f"acknowledged p50 {lat['gateway_lag_p50_ms']} ms, p99 {lat['gateway_lag_p99_ms']} ms; "
        f"PUBACK p50 {lat['puback_p50_ms']} ms, p99 {lat['puback_p99_ms']} ms; "
        f"lost in the sink over all steps: {sum(r['lost'] for r in results + [lat])}",
        flush=True,
    )
    return {"steps": results, "best": best, "latency": lat}


def scale(work, vm, devices, will=False):
    extra = {"GATEWAY_MQTT__MAX_CONNECTIONS": str(devices + 100)}
    gw = Gateway(work, vm.url, "embedded", extra=extra)
    time.sleep(1)
    before = status_kib(gw.proc.pid, "VmRSS")
    fds_before = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
    run = f"scale-{devices}-{int(will)}"
    # One message a minute per device for a little over a minute: every device connects,
    # publishes, and stays connected while the RSS is read.
    sim = subprocess.Popen(
        [
            SIMULATOR, "run", "--port", str(gw.port), "--devices", str(devices),
            "--rate", f"{1 / 60:.6f}", "--duration", "75s", "--format", "cbor",
            "--run-id", run, "--connect-rate", "2000", "--report", f"{work}/{run}.json",
            *(["--will"] if will else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    connect_secs = devices / 2000 + 15
    time.sleep(connect_secs)
    during = status_kib(gw.proc.pid, "VmRSS")
    fds_during = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
    sim.wait()
    with open(f"{work}/{run}.json") as f:
        report = json.load(f)
    gw.stop()
    connected = devices - report["devices_failed"]
    return {
        "devices": devices,
        "connected": connected,
        # A device with a will has a broker session (three descriptors), as one that
        # subscribes does.
        "will": will,
        "rss_before_mib": before / 1024,
        "rss_connected_mib": during / 1024,
        "kib_per_connection": (during - before) / max(connected, 1),
        "fds_per_connection": (fds_during - fds_before) / max(connected, 1),
        "errors": report.get("errors", [])[:3],
    }


class Sampler:
    """Samples a gateway's RSS and a few gauges every 100 ms, keeping the peaks since the last
    `take()`."""

    GAUGES = ["gateway_unacked_messages", "gateway_acks_pending", "gateway_queue_readings"]

    def __init__(self, gw):
        self.gw, self.lock, self.done = gw, threading.Lock(), False
        self.reset()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def reset(self):
        self.peak_rss = 0
        self.peaks = {g: 0.0 for g in self.GAUGES}

    def run(self):
        while not self.done:
            rss = status_kib(self.gw.proc.pid, "VmRSS")
            values = {g: self.gw.metric(g) or 0.0 for g in self.GAUGES}
            with self.lock:
                self.peak_rss = max(self.peak_rss, rss)
                for g, v in values.items():
                    self.peaks[g] = max(self.peaks[g], v)
            time.sleep(0.1)

    def take(self):
        with self.lock:
            out = {"peak_rss_mib": self.peak_rss / 1024, **{f"peak_{g}": v for g, v in self.peaks.items()}}
            self.reset()
        return out

    def stop(self):
        self.done = True
        self.thread.join()


def overload(work, vm, periods=3, devices=100, rate_per_device=120, secs=10, per_msg=100, sink_rate=200_000):
    """External mode when the broker delivers far faster than the sink takes: mosquitto with no
    in-flight limit (`max_inflight_messages 0`, as it is often run: it then ignores the
    gateway's receive maximum), a sink held to `sink_rate` readings/s by the fault proxy,
    `periods` bursts of devices × rate × secs messages back to back, each drained before the
    next. Per period: the gateway's peak RSS, its RSS once drained, and the peaks of the
    unacknowledged messages and of the acknowledgements due but not yet sent."""
    proxy = subprocess.Popen([FAULT_PROXY, vm.url, str(sink_rate)], stdout=subprocess.PIPE, text=True)
    proxy_url = proxy.stdout.readline().strip()
    mosquitto, mq_port = start_mosquitto(work, "overload", max_inflight=0)
    gw = Gateway(work, proxy_url, "external", f"mqtt://127.0.0.1:{mq_port}")
    sampler = Sampler(gw)
    results, sent, runs = [], 0, []
    try:
        for period in range(periods):
            run = f"overload-{period}"
            runs.append(run)
            started = time.time()
            report = simulate(mq_port, run, devices, devices * rate_per_device, secs, per_msg, f"{work}/{run}.json")
            sent += report["readings_sent"]
            published = time.time()
            deadline = published + 600
            while (gw.metric("gateway_sink_readings_written_total") or 0) < sent and time.time() < deadline:
                time.sleep(0.1)
            drained = time.time()
            while (gw.metric("gateway_unacked_messages") or 0) > 0 and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(1)
            r = sampler.take()
            r.update(
                period=period + 1,
                messages=report["messages_sent"],
                readings=report["readings_sent"],
                published_messages_per_sec=report["messages_per_sec"],
                publish_secs=published - started,
                drain_secs=drained - published,
                rss_drained_mib=status_kib(gw.proc.pid, "VmRSS") / 1024,
                written=gw.metric("gateway_sink_readings_written_total"),
            )
            results.append(r)
            print(
                f"  overload period {r['period']}: {r['messages']} messages ({r['published_messages_per_sec']:.0f} msg/s "
                f"published), drained {r['drain_secs']:.1f} s after the last publish; RSS peak {r['peak_rss_mib']:.0f} MiB, "
                f"{r['rss_drained_mib']:.0f} MiB once drained; peaks: unacked {r['peak_gateway_unacked_messages']:.0f}, "
                f"acks due not sent {r['peak_gateway_acks_pending']:.0f}, queue {r['peak_gateway_queue_readings']:.0f} readings",
                flush=True,
            )
    finally:
        sampler.stop()
        gw.stop()
        mosquitto.terminate()
        mosquitto.wait()
        proxy.terminate()
        proxy.wait()
    seen = 0
    deadline = time.time() + 600
    while time.time() < deadline:
        seen = sum(vm.count(run) for run in runs)
        if seen >= sent:
            break
        time.sleep(2)
    print(f"  overload: {sent} readings published, {seen} in the sink, lost {max(sent - seen, 0)}", flush=True)
    return {"periods": results, "readings": sent, "in_sink": seen, "lost": max(sent - seen, 0), "sink_readings_per_sec": sink_rate}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--secs", type=int, default=10, help="publishing time of each step")
    p.add_argument("--devices", type=int, default=100, help="devices in the throughput steps")
    p.add_argument("--quick", action="store_true", help="fewer, shorter steps (a smoke run)")
    p.add_argument("--only", choices=["raw", "ramp", "overload", "scale"], action="append")
    p.add_argument("--modes", default="embedded,received,external", help="ramps to run")
    p.add_argument("--merge", help="add the results to this earlier JSON (ratios recomputed)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every gateway of the run, e.g. GATEWAY_WAL__COMMIT_INTERVAL=1ms")
    args = p.parse_args()
    EXTRA_ENV.update(kv.split("=", 1) for kv in args.env)
    only = set(args.only or ["raw", "ramp", "overload", "scale"])
    secs = 3 if args.quick else args.secs
    work = tempfile.mkdtemp(prefix="gateway-bench-")
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        },
        "command": " ".join(["./scripts/bench.sh"] + sys.argv[1:]),
    }
    vm = VictoriaMetrics(work)
    mosquitto = None
    try:
        if "raw" in only:
            raw, cores = raw_sink_rate(vm, 400_000 if args.quick else 2_000_000, 5000, 4)
            results["raw_sink_lines_per_sec"] = raw
            results["raw_sink_cores"] = cores
            print(
                f"raw sink (VictoriaMetrics, 5,000-line batches, 4 in flight): {raw:,.0f} lines/s, "
                f"the sink using {cores:.2f} cores",
                flush=True,
            )
        if "ramp" in only:
            mosquitto, mq_port = start_mosquitto(work, "ramp", max_inflight=1000)
            mqtt_url = f"mqtt://127.0.0.1:{mq_port}"
            one = [20_000, 60_000] if args.quick else [10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 120_000, 150_000, 180_000]
            hundred = [1_000, 4_000] if args.quick else [1_000, 2_000, 4_000, 6_000, 8_000, 10_000, 12_000]
            results["ramps"] = {}
            if args.merge:
                earlier = json.load(open(args.merge))
                results["raw_sink_lines_per_sec"] = earlier.get("raw_sink_lines_per_sec")
                results["raw_sink_cores"] = earlier.get("raw_sink_cores")
                results["ramps"] = earlier.get("ramps", {})
                results["scale"] = earlier.get("scale", [])
                results["merged_from"] = earlier.get("command")
            for mode in args.modes.split(","):
                for per_msg, rates in [(1, one), (100, hundred)]:
                    results["ramps"][f"{mode}-{per_msg}"] = ramp(
                        work, vm, mode, mqtt_url, per_msg, rates, args.devices, secs
                    )
            raw = results.get("raw_sink_lines_per_sec")
            r = results["ramps"]
            best = lambda k: r[k]["best"]["delivered_readings_per_sec"]
            have = lambda *ks: all(k in r for k in ks)
            ratios = {}
            for mode in ["embedded", "received", "external"]:
                if have(f"{mode}-100") and raw:
                    ratios[f"{mode}_100_vs_raw_sink"] = best(f"{mode}-100") / raw
            if have("embedded-1", "received-1"):
                ratios["durable_vs_received_1"] = best("embedded-1") / best("received-1")
                ratios["durable_cpu_per_msg_vs_received_1"] = (
                    r["embedded-1"]["best"]["cpu_us_per_message"] / r["received-1"]["best"]["cpu_us_per_message"]
                )
            if have("embedded-1", "external-1"):
                ratios["embedded_vs_external_1"] = best("embedded-1") / best("external-1")
            if have("embedded-100", "external-100"):
                ratios["embedded_vs_external_100"] = best("embedded-100") / best("external-100")
            results["ratios"] = ratios
            print("ratios:", json.dumps(ratios, indent=1), flush=True)
        if "overload" in only:
            print("external mode under overload:", flush=True)
            results["overload"] = overload(work, vm, periods=1 if args.quick else 3, secs=secs)
        if "scale" in only:
            results["scale"] = []
            # This machine's hard limit of open files (20,000) caps one process. A device that
            # only publishes telemetry costs the gateway one descriptor (its socket): 18,000
            # leaves room for the rest.
            for devices, will in [(1000, False), (18_000, False), (1000, True), (5_000, True)]:
                if args.quick and devices > 1000:
                    continue
                s = scale(work, vm, devices, will)
                results["scale"].append(s)
                print(
                    f"scale: {s['connected']} of {devices} devices connected{' with a will' if will else ''}: "
                    f"RSS {s['rss_before_mib']:.0f} -> {s['rss_connected_mib']:.0f} MiB, "
                    f"{s['kib_per_connection']:.1f} KiB and {s['fds_per_connection']:.2f} file descriptors per connection",
                    flush=True,
                )
    finally:
        if mosquitto:
            mosquitto.terminate()
            mosquitto.wait()
        vm.stop()
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"figures: {args.out} (work files in {work})")


if __name__ == "__main__":
    main()
