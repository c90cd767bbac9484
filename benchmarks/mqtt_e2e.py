"""End-to-end MQTT delivery of all-MiniLM-L6-v2 through a local mosquitto.

Three deliveries, each to a receiver in a fresh process (``--role``), listening before the host
publishes:

* the full model as an NNR bitstream (NNCodec 2.1.3, qp -32, DQ; ``benchmarks/_minilm.py``),
  received by the device service (``transports.mqtt.Receiver``) that streams it into its
  model.safetensors;
* an update of it (``nnc_edge.updates.encode_update`` at qp -44; 5 % of each float tensor's weights
  moved by 1 % of the tensor's standard deviation), applied by the same device to the model it holds;
* the raw .safetensors file of the full model, cut into messages of the same size with the same
  envelope, reassembled into a file (temporary file, fsync, rename): what delivery costs without NNC.

Reported per delivery: the file's bytes, MQTT messages, bytes on the wire (the PUBLISH packets the
host sends: MQTT framing, topic and envelope included; TCP/IP not), the time from the first
message's arrival at the receiver to its model file written, and the receiver's peak RSS (and its
growth over the RSS after imports and connecting).

    python benchmarks/mqtt_e2e.py [--max-message-bytes 65536] [--reference-venv /tmp/refvenv]

Needs mosquitto (``apt-get install mosquitto``). Without the reference venv or a cached NNCodec
stream, the full model is encoded with nnc-edge's own encoder instead (said in the output).
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

MODEL = "minilm"
UPDATE_QP = -44
RAW_TOPIC = "bench/raw"


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def rss():
    return _status("VmRSS")


def peak_rss():
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak over fork and exec into that.
    return _status("VmHWM")


# --- receivers (each in its own process) ---------------------------------------------------------
async def receive_nnr(url, directory, timeout):
    from transports import mqtt
    store = mqtt.ModelStore(directory, MODEL)
    have = store.version
    rx = mqtt.Receiver(store)
    stop = asyncio.Event()
    rx.on_applied = lambda env: stop.set()
    task = asyncio.ensure_future(mqtt.run_receiver(mqtt.BrokerSettings(url), rx, stop, tick=0.2))
    target = mqtt.topics("nnc", MODEL).publication(have[0] + 1 if have else 1)
    # Ready when listening for the next version (a fresh device waits for the status).
    while not (rx.connected and (have is None or rx.subscribed == target)):
        await asyncio.sleep(0.01)
    baseline = rss()
    print("READY", flush=True)
    await asyncio.wait_for(task, timeout)
    seq, kind, nbytes, seconds = rx.applied[-1]
    return {"seconds": seconds, "baseline": baseline, "peak": peak_rss(), "kind": kind, "bytes": nbytes}


async def receive_raw(url, path, timeout):
    from nnc_edge.atomicfile import commit, discard, temp_beside
    from transports import envelope, mqtt
    result = {}
    async with mqtt.BrokerSettings(url).client("raw") as client:
        await client.subscribe(RAW_TOPIC + "/+", qos=1)
        baseline = rss()
        print("READY", flush=True)
        messages = client.messages.__aiter__()
        assembly = f = tmp = None
        try:
            while assembly is None or not assembly.complete:
                message = await asyncio.wait_for(messages.__anext__(), timeout)
                if not message.payload:
                    continue
                env = envelope.parse(message.payload)
                if assembly is None:
                    start = time.monotonic()
                    assembly = envelope.Assembly(env)
                    f, tmp = temp_beside(path, ".tmp")
                for body in assembly.add(env):
                    f.write(body)
            assembly.check()
            commit(f, tmp, path)
            f = tmp = None
            result = {"seconds": time.monotonic() - start, "baseline": baseline, "peak": peak_rss(),
                      "bytes": assembly.released}
        finally:
            discard(f, tmp)
    return result


def role_main(args):
    if args.role == "nnr":
        result = asyncio.run(receive_nnr(args.broker, args.dir, args.timeout))
    else:
        result = asyncio.run(receive_raw(args.broker, os.path.join(args.dir, "model.safetensors"), args.timeout))
    print("RESULT " + json.dumps(result), flush=True)


# --- the host -------------------------------------------------------------------------------------
class Receiver:
    """A receiver process; ``ready()`` waits for it to listen, ``result()`` for its numbers."""

    def __init__(self, role, url, directory, timeout=600):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", role, "--broker", url,
                                      "--dir", directory, "--timeout", str(timeout)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def ready(self):
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError("receiver did not start: %r" % line)

    def result(self):
        out, _ = self.proc.communicate(timeout=900)
        if self.proc.returncode:
            raise RuntimeError("receiver failed with status %d" % self.proc.returncode)
        return json.loads(out.strip().splitlines()[-1][len("RESULT "):])


def perturb(model, rng, fraction=0.05, scale=0.01):
    """5 % of each float tensor's entries moved by 1 % of its standard deviation."""
    import numpy as np
    new = {}
    for name, a in model.items():
        if a.dtype != np.float32 or a.size < 2:
            new[name] = a
            continue
        b = a.copy().reshape(-1)
        idx = rng.choice(b.size, max(1, int(fraction * b.size)), replace=False)
        b[idx] += (scale * float(a.std()) * rng.standard_normal(idx.size)).astype(np.float32)
        new[name] = b.reshape(a.shape)
    return new


def full_stream(reference_venv, cache):
    import _minilm
    try:
        return _minilm.minilm_stream(0, reference_venv), "NNCodec 2.1.3, qp -32, DQ"
    except RuntimeError:
        pass
    from nnc_edge import modelio
    from nnc_edge.encoder.encoding import encode
    out = os.path.join(cache, "all-minilm-l6-v2_nnc-edge_qp-32.nnc")
    if not os.path.exists(out):
        with open(out + ".part", "wb") as f:
            f.write(encode(modelio.load(_minilm.minilm_weights())))
        os.replace(out + ".part", out)
    return out, "nnc-edge's encoder, qp -32, DQ (no NNCodec reference venv)"


async def publish_raw(url, data, max_message_bytes):
    from transports import envelope, mqtt
    body = max_message_bytes - envelope.header_bytes(RAW_TOPIC.replace("/", "-"))
    bodies = [data[i:i + body] for i in range(0, len(data), body)]
    _, payloads = envelope.messages(RAW_TOPIC.replace("/", "-"), envelope.FULL, 1, bodies)
    publisher = mqtt.Publisher(mqtt.BrokerSettings(url), MODEL)  # for its windowed, counted sending
    async with publisher.settings.client("raw-pub", publisher.window) as client:
        await publisher._put_all(client, [("%s/%d" % (RAW_TOPIC, i), p) for i, p in enumerate(payloads)])
        await publisher._put_all(client, [("%s/%d" % (RAW_TOPIC, i), b"") for i in range(len(payloads))])
    return len(payloads), publisher.wire_bytes - sum(mqtt.publish_packet_bytes("%s/%d" % (RAW_TOPIC, i), b"")
                                                     for i in range(len(payloads)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-message-bytes", type=int, default=64 << 10)
    parser.add_argument("--reference-venv", default=None)
    parser.add_argument("--role", choices=("nnr", "raw"), help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return role_main(args)

    import numpy as np

    import _minilm
    import nnc_edge
    from nnc_edge import modelio
    from nnc_edge.cli.demo import MosquittoProcess
    from nnc_edge.updates import encode_update
    from transports import mqtt
    from transports.envelope import FULL, UPDATE

    weights_path = _minilm.minilm_weights()
    stream_path, coder = full_stream(args.reference_venv, _minilm.cache_dir())
    with open(stream_path, "rb") as f:
        stream = f.read()
    with open(weights_path, "rb") as f:
        raw = f.read()
    view = nnc_edge.decode(stream)
    t = time.monotonic()
    target = perturb(view, np.random.default_rng(0))
    # qp -44: the moves are 1 % of a tensor's spread, and the model's own step (qp -32) would zero most.
    update, updated_view = encode_update(view, target, qp=UPDATE_QP, return_model=True)
    encode_seconds = time.monotonic() - t
    moved = sum(int(np.count_nonzero(target[k] != view[k])) for k in view)
    changed = sum(int(np.count_nonzero(updated_view[k] != view[k])) for k in view)

    work = tempfile.mkdtemp(prefix="nnc-edge-mqtt-e2e-")
    broker = MosquittoProcess(os.path.join(work, "broker"), ["allow_anonymous true", "max_queued_messages 100000"])
    broker.start()
    version = subprocess.run([broker.binary, "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    rows = []
    try:
        device = os.path.join(work, "device")
        for label, kind, data in (("full model, NNR", FULL, stream), ("update, NNR", UPDATE, update)):
            receiver = Receiver("nnr", broker.url, device)
            receiver.ready()
            publisher = mqtt.Publisher(mqtt.BrokerSettings(broker.url), MODEL,
                                       max_message_bytes=args.max_message_bytes)
            status = asyncio.run(publisher.publish(data, kind))
            result = receiver.result()
            rows.append((label, len(data), status.counts[-1], publisher.wire_bytes, result))
        got = modelio.load(os.path.join(device, "model.safetensors"))
        same = list(got) == list(updated_view) and all(np.array_equal(got[k], v) for k, v in updated_view.items())
        assert same, "the device's model differs from the host's view"
        receiver = Receiver("raw", broker.url, os.path.join(work, "raw"))
        os.makedirs(os.path.join(work, "raw"))
        receiver.ready()
        count, wire = asyncio.run(publish_raw(broker.url, raw, args.max_message_bytes))
        result = receiver.result()
        with open(os.path.join(work, "raw", "model.safetensors"), "rb") as f:
            assert f.read() == raw
        rows.append(("full model, raw .safetensors", len(raw), count, wire, result))
    finally:
        broker.stop()

    params = sum(int(a.size) for a in view.values())
    print("all-MiniLM-L6-v2 (%.1f M parameters) through %s on loopback, QoS 1, messages of at most %d bytes"
          % (params / 1e6, version.strip(), args.max_message_bytes))
    print("full model: %s\nupdate: 5%% of each float tensor moved by 1%% of its std (%s parameters), coded by "
          "encode_update at qp %d in %.1f s;\n        it changes %s parameters of the device's model\n"
          % (coder, "{:,}".format(moved), UPDATE_QP, encode_seconds, "{:,}".format(changed)))
    print("%-30s %12s %9s %12s %14s %18s" % ("delivery", "file bytes", "messages", "wire bytes",
                                             "first->written", "receiver peak RSS"))
    for label, size, count, wire, r in rows:
        print("%-30s %12s %9d %12s %12.2f s %9.1f MiB (+%.1f)" % (
            label, "{:,}".format(size), count, "{:,}".format(wire), r["seconds"], r["peak"] / 2 ** 20,
            (r["peak"] - r["baseline"]) / 2 ** 20))
    nnr, upd, rawrow = rows
    print("\nwire bytes: full model NNR / raw = %.3f, update NNR / raw = %.5f"
          % (nnr[3] / rawrow[3], upd[3] / rawrow[3]))
    print("the wire bytes alone at 10 Mbit/s: full model NNR %.1f s, update NNR %.2f s, raw .safetensors %.1f s"
          % (nnr[3] * 8e-7, upd[3] * 8e-7, rawrow[3] * 8e-7))


if __name__ == "__main__":
    main()
