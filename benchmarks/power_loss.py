"""Power loss on the device: processes killed (SIGKILL) at random points while they replace the model.

    python benchmarks/power_loss.py [--kills 100] [--seed 0] [--scenarios apply,download,receiver]

Issue 16 ("a power-loss test"). Each scenario replaces the device's model file ``model.safetensors``
(the silero-vad model of the conformance vectors, 1.2 MB) in a child process:

* ``apply``: ``nnc-edge apply --base model.safetensors u2.nnc -o model.safetensors``, update 2 of a
  chain (temporal context adaptation: it reads the chain state update 1 left and writes a new one);
* ``download``: ``nnc-edge decode --stream full.nnc -o model.safetensors``, a full model written
  slice by slice (nnc_edge.sinks);
* ``receiver``: the MQTT device service (transports.mqtt.Receiver, its full-model writer) handed the
  retained status and the messages of a full model, as the broker would deliver them.

A trial starts the child, waits until it has imported what it needs (it prints READY), sleeps a
random time between 0 and 1.2 times what an uninterrupted run of the work takes (measured first),
and kills it. Then, in this process:

1. the model file must be byte for byte the old model or the new one;
2. a later run of the same work (not killed) must leave the new model: ``apply`` exits 0 if the
   model was the old one, 2 ("already applied") if it was the new one; the others exit 0;
3. after that run the device's folder must hold exactly what an uninterrupted run leaves (the
   model, and for ``apply`` its one chain-state file): no temporary file, no stale state file.

Prints per scenario how many kills left the old model and how many the new one (``late``: the child
had finished before the kill), and any violation. Exit status 1 when there was one.
tests/test_power_loss.py runs the same trials, fewer of them.
"""

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

CONFORMANCE = os.environ.get("NNC_CONFORMANCE_DIR") or os.path.join(os.path.dirname(REPO), "shared", "conformance",
                                                                    "nncodec-2.1.3")
MODEL = "model.safetensors"
NAME = "kws"
SCENARIOS = ("apply", "download", "receiver")


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- what the children do -------------------------------------------------------------------------
def apply_argv(work, device):
    path = os.path.join(device, MODEL)
    return ["apply", "--base", path, os.path.join(work, "u2.nnc"), "-o", path, "-q"]


def download_argv(work, device):
    return ["decode", "--stream", os.path.join(work, "full.nnc"), "-o", os.path.join(device, MODEL), "-q"]


def receive(work, device, seq=2):
    """Hand the receiver the status and the messages of the full model ``seq`` in work/."""
    from transports import mqtt

    store = mqtt.ModelStore(device, NAME, threads=1)
    rx = mqtt.Receiver(store, gap_timeout=60.0)
    with open(os.path.join(work, "publication-%d" % seq), "rb") as f:
        status, messages = _unpack(f.read())

    async def feed():
        rx.on_status(status)
        for i, payload in enumerate(messages):
            await rx.handle(rx.topics.data(seq, i), payload)
    asyncio.run(feed())
    return 0 if store.version is not None and store.version[0] == seq else 1


def work_status(scenario, work, device):
    """Do the scenario's work in this process; returns its exit status."""
    from nnc_edge import cli

    if scenario == "receiver":
        return receive(work, device)
    argv = apply_argv(work, device) if scenario == "apply" else download_argv(work, device)
    return cli.main(argv)


def run_work(scenario, work, device):
    """work_status, what it says (a refusal, the receiver's log) kept from the summary."""
    with contextlib.redirect_stderr(io.StringIO()):
        return work_status(scenario, work, device)


def child(scenario, work, device):
    from nnc_edge import cli
    from transports import mqtt  # noqa: F401  (imported before READY: the kill lands in the work)

    cli.build_parser()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    status = work_status(scenario, work, device)
    sys.stdout.write("DONE\n")  # the interpreter's exit, which takes a while, is not the work
    sys.stdout.flush()
    return status


def _pack(status, messages):
    out = bytearray()
    for part in [status] + messages:
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def _unpack(data):
    parts = []
    at = 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "big")
        parts.append(data[at + 4:at + 4 + n])
        at += 4 + n
    return parts[0], parts[1:]


# --- the inputs -----------------------------------------------------------------------------------
class Scenario:
    """One scenario's inputs in ``work`` and the device folder it starts from (``initial``), with
    the SHA-256 of the model before and after, and the names in the folder after a complete run."""

    def __init__(self, name, work):
        self.name = name
        self.work = work
        self.initial = os.path.join(work, "initial-" + name)
        self.old = sha(os.path.join(self.initial, MODEL))
        done = os.path.join(work, "done-" + name)
        self.reset(done)
        with self.started(done) as proc:
            start = time.monotonic()
            proc.stdout.readline()
            self.seconds = time.monotonic() - start  # of the work alone, in a child as the trials run it
            status = proc.wait()
            if status != 0:
                raise RuntimeError("%s: an uninterrupted run exited with %d: %s"
                                   % (name, status, proc.stderr.read().decode(errors="replace")))
        self.new = sha(os.path.join(done, MODEL))
        self.names = sorted(os.listdir(done))
        if self.new == self.old:
            raise RuntimeError("%s: the old and the new model are the same" % name)

    def reset(self, device):
        if os.path.exists(device):
            shutil.rmtree(device)
        shutil.copytree(self.initial, device)

    @contextlib.contextmanager
    def started(self, device):
        """The child doing the work on ``device``, once it is ready to start it."""
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", self.name, self.work, device],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        try:
            line = proc.stdout.readline()
            if line.strip() != b"READY":
                proc.wait()
                raise RuntimeError("the child did not start: %s" % (line + proc.stderr.read()).decode(errors="replace"))
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()


def prepare(work, scenarios=SCENARIOS):
    """Write the inputs of the scenarios into ``work``; returns {name: Scenario}."""
    import numpy as np

    import nnc_edge
    from nnc_edge import modelio
    from nnc_edge.updates import ChainState, apply_update, encode_update, model_digest

    base = nnc_edge.decode(os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc"))
    rng = np.random.default_rng(0)
    model, state = base, ChainState(model_digest(base))
    for i in (1, 2):
        new = {}
        for name, w in model.items():
            moved = rng.random(w.shape) < 0.05
            new[name] = (w + moved * rng.normal(0.0, 0.01 * (float(w.std()) or 1.0), w.shape)).astype(w.dtype)
        data, model = encode_update(model, new, residual=state, return_model=True)
        with open(os.path.join(work, "u%d.nnc" % i), "wb") as f:
            f.write(data)
    initial = os.path.join(work, "initial-apply")
    os.makedirs(initial)
    modelio.save(os.path.join(initial, MODEL), base)
    apply_update(os.path.join(initial, MODEL), os.path.join(work, "u1.nnc"), os.path.join(initial, MODEL))

    # A full model replaces a different one (the model after update 1, as the device may have it).
    shutil.copy(os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc"), os.path.join(work, "full.nnc"))
    os.makedirs(os.path.join(work, "initial-download"))
    shutil.copy(os.path.join(initial, MODEL), os.path.join(work, "initial-download", MODEL))

    _prepare_receiver(work)
    return {name: Scenario(name, work) for name in scenarios}


def _prepare_receiver(work):
    """The device at version 1 (a small full model), and publication 2 (silero-vad, full)."""
    from transports import envelope, mqtt

    for seq, path in ((1, os.path.join(CONFORMANCE, "p1_model_dict.nnc")), (2, os.path.join(work, "full.nnc"))):
        with open(path, "rb") as f:
            bodies = mqtt.split_bitstream(f.read(), 4096 - envelope.header_bytes(NAME))
        digest, payloads = envelope.messages(NAME, envelope.FULL, seq, bodies)
        status = envelope.Status(NAME, seq, digest, seq, [len(payloads)]).payload()
        with open(os.path.join(work, "publication-%d" % seq), "wb") as f:
            f.write(_pack(status, payloads))
    if receive(work, os.path.join(work, "initial-receiver"), 1) != 0:
        raise RuntimeError("the receiver did not take version 1")


# --- the trials -----------------------------------------------------------------------------------
class Outcome:
    def __init__(self):
        self.old = self.new = self.late = 0
        self.violations = []


def trial(scenario, device, delay, outcome):
    """Kill the scenario's child after ``delay`` seconds of work, then check and recover."""
    scenario.reset(device)
    with scenario.started(device) as proc:
        time.sleep(delay)
        proc.kill()
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        outcome.late += 1
    path = os.path.join(device, MODEL)
    now = sha(path) if os.path.exists(path) else None
    was_old = now == scenario.old
    if now not in (scenario.old, scenario.new):
        outcome.violations.append("%s after %.3f s: the model is neither the old nor the new one" % (scenario.name,
                                                                                                   delay))
        return
    outcome.old += was_old
    outcome.new += not was_old
    status = run_work(scenario.name, scenario.work, device)
    expected = 0 if was_old or scenario.name != "apply" else 2
    if status != expected or sha(path) != scenario.new:
        outcome.violations.append("%s after %.3f s: the next run exited with %d (%d expected), the model is %s"
                                  % (scenario.name, delay, status, expected,
                                     "the new one" if sha(path) == scenario.new else "not the new one"))
    names = sorted(os.listdir(device))
    if names != scenario.names:
        outcome.violations.append("%s after %.3f s: the folder holds %s, %s expected"
                                  % (scenario.name, delay, names, scenario.names))


def run_trials(scenario, kills, rng, device):
    outcome = Outcome()
    for _ in range(kills):
        trial(scenario, device, rng.uniform(0.0, 1.2 * scenario.seconds), outcome)
    return outcome


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="kills per scenario (default %(default)d)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--child", nargs=3, metavar=("SCENARIO", "WORK", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    names = [n for n in args.scenarios.split(",") if n]
    rng = random.Random(args.seed)
    failed = False
    with tempfile.TemporaryDirectory(prefix="nnc-power-loss-") as work:
        scenarios = prepare(work, names)
        print("power loss: %d SIGKILLs per scenario at a random time in [0, 1.2 x the work's duration]; seed %d"
              % (args.kills, args.seed))
        print("%-9s %8s %6s %6s %6s %6s  %s" % ("scenario", "work", "kills", "old", "new", "late", "result"))
        for name in names:
            scenario = scenarios[name]
            start = time.monotonic()
            outcome = run_trials(scenario, args.kills, rng, os.path.join(work, "device"))
            if outcome.violations:
                result = "%d VIOLATIONS: %s" % (len(outcome.violations), "; ".join(outcome.violations[:3]))
                failed = True
            else:
                result = "ok: old or new model each time, recovered, nothing left behind"
            print("%-9s %6.0fms %6d %6d %6d %6d  %s (%.0f s)" % (name, 1000 * scenario.seconds, args.kills, outcome.old,
                                                                outcome.new, outcome.late, result,
                                                                time.monotonic() - start))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
