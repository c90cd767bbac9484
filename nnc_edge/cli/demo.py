"""``nnc-edge demo``: the whole job on one machine.

A host trains a small numpy classifier (a two-layer perceptron on synthetic data) for a few rounds.
After the first round it publishes the full model (``nnc_edge.encode``), after every later round an
update against the model the device has (``nnc_edge.updates.encode_update``, a chain with error
feedback). A device task in the same process receives them over MQTT (``transports.mqtt``) into
its own model file. Each round prints what went over the wire, what the full model would have
cost, and the accuracy of the device's model (read back from its file) next to the host's.

Without a broker URL one is started for the demo: amqtt inside this process when it is installed,
else a mosquitto process when the binary is found (``LocalBroker``).
"""

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np

from .. import modelio

LOOPBACK = "127.0.0.1"


class DemoError(Exception):
    def __init__(self, message, status=1):
        Exception.__init__(self, message)
        self.status = status


# --- a broker for the demo ----------------------------------------------------------------------
def free_port():
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def mosquitto_binary():
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


class MosquittoProcess:
    """A mosquitto process listening on a loopback port, its config, log and persistence file in
    ``directory``; ``config`` adds lines to the generated config."""

    def __init__(self, directory, config=(), port=None, scheme="mqtt"):
        self.binary = mosquitto_binary()
        if self.binary is None:
            raise DemoError("mosquitto is not installed")
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or free_port()
        self.log = os.path.join(self.directory, "mosquitto.log")
        self.config = os.path.join(self.directory, "mosquitto.conf")
        import pwd  # mosquitto started as root switches to this user: keep ours, who owns the directory
        lines = ["listener %d %s" % (self.port, LOOPBACK), "log_dest file %s" % self.log,
                 "user %s" % pwd.getpwuid(os.getuid()).pw_name] + list(config)
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.url = "%s://%s:%d" % (scheme, LOOPBACK, self.port)
        self.proc = None

    def start(self, timeout=10.0):
        self.proc = subprocess.Popen([self.binary, "-c", self.config], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc = None
                raise DemoError("mosquitto exited at start: %s%s" % (err.strip(), self.tail()))
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise DemoError("mosquitto did not open port %d within %g s%s" % (self.port, timeout, self.tail()))

    def tail(self, lines=10):
        try:
            with open(self.log, errors="replace") as f:
                return "\n" + "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        """SIGTERM: a clean shutdown (mosquitto saves its retained messages when persistent)."""
        self._end(False)

    def kill(self):
        """SIGKILL: gone at once, nothing saved since the last autosave."""
        self._end(True)

    def _end(self, kill):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        proc.stderr.close()


class LocalBroker:
    """An MQTT broker on a free loopback port for the demo: amqtt in this process if it is installed,
    else mosquitto as a child process. ``description`` says which."""

    def __init__(self, directory):
        self.directory = directory
        self.url = None
        self.description = None
        self._amqtt = None
        self._mosquitto = None

    async def start(self):
        try:
            import amqtt
            from amqtt.broker import Broker
        except ImportError:
            amqtt = None
        if amqtt is not None:
            port = free_port()
            config = {"listeners": {"default": {"type": "tcp", "bind": "%s:%d" % (LOOPBACK, port)}},
                      "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
            self._amqtt = Broker(config)
            await self._amqtt.start()
            self.url = "mqtt://%s:%d" % (LOOPBACK, port)
            self.description = "embedded amqtt %s broker in this process on %s" % (
                getattr(amqtt, "__version__", ""), self.url)
            return self
        if mosquitto_binary() is None:
            raise DemoError("no MQTT broker to start: install amqtt (pip install amqtt, Python 3.10 or later) or "
                            "mosquitto, or pass --broker mqtt://HOST:PORT")
        self._mosquitto = await asyncio.to_thread(MosquittoProcess(self.directory).start)
        self.url = self._mosquitto.url
        self.description = "amqtt is not installed: started %s as a child process on %s" % (
            self._mosquitto.binary, self.url)
        return self

    async def stop(self):
        if self._amqtt is not None:
            broker, self._amqtt = self._amqtt, None
            await broker.shutdown()
        if self._mosquitto is not None:
            proc, self._mosquitto = self._mosquitto, None
            await asyncio.to_thread(proc.stop)


# --- the host's model: a two-layer perceptron ------------------------------------------------------
FEATURES = 64
HIDDEN = 256
CLASSES = 10


def make_data(rng, n_train=6000, n_test=2000):
    """Gaussian clusters, one per class, overlapping enough that training takes a few rounds."""
    centers = rng.normal(0.0, 1.0, (CLASSES, FEATURES)).astype(np.float32)
    def draw(n):
        y = rng.integers(0, CLASSES, n)
        x = centers[y] + rng.normal(0.0, 2.5, (n, FEATURES)).astype(np.float32)
        return x.astype(np.float32), y
    return draw(n_train), draw(n_test)


def init_model(rng):
    return {
        "fc1.weight": (rng.normal(0.0, 1.0, (HIDDEN, FEATURES)) / np.sqrt(FEATURES)).astype(np.float32),
        "fc1.bias": np.zeros(HIDDEN, np.float32),
        "fc2.weight": (rng.normal(0.0, 1.0, (CLASSES, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32),
        "fc2.bias": np.zeros(CLASSES, np.float32),
    }


def forward(model, x):
    h = np.maximum(x @ model["fc1.weight"].T + model["fc1.bias"], 0.0)
    return h, h @ model["fc2.weight"].T + model["fc2.bias"]


def accuracy(model, data):
    x, y = data
    return float(np.mean(np.argmax(forward(model, x)[1], axis=1) == y))


def train_round(model, data, rng, lr=0.01, batch=100):
    """One epoch of minibatch SGD on softmax cross-entropy; returns a new model."""
    model = {k: v.copy() for k, v in model.items()}
    x, y = data
    order = rng.permutation(len(y))
    for start in range(0, len(y), batch):
        idx = order[start:start + batch]
        xb, yb = x[idx], y[idx]
        h, logits = forward(model, xb)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0
        g = p / len(yb)
        gh = (g @ model["fc2.weight"]) * (h > 0)
        model["fc2.weight"] -= lr * (g.T @ h).astype(np.float32)
        model["fc2.bias"] -= lr * g.sum(axis=0).astype(np.float32)
        model["fc1.weight"] -= lr * (gh.T @ xb).astype(np.float32)
        model["fc1.bias"] -= lr * gh.sum(axis=0).astype(np.float32)
    return model


# --- the demo -------------------------------------------------------------------------------------
def run(settings, args, out):
    return asyncio.run(_demo(settings, args, out))


async def _demo(settings, args, out):
    from transports import mqtt

    work = tempfile.mkdtemp(prefix="nnc-edge-demo-")
    broker = None
    try:
        if settings is None:
            broker = await LocalBroker(os.path.join(work, "broker")).start()
            out.write("broker: %s\n" % broker.description)
            settings = mqtt.BrokerSettings(broker.url)
        else:
            out.write("broker: %r\n" % settings)
        device_dir = args.out or os.path.join(work, "device")
        store = mqtt.ModelStore(device_dir, args.model)
        receiver = mqtt.Receiver(store)
        stop = asyncio.Event()
        device = asyncio.ensure_future(mqtt.run_receiver(settings, receiver, stop, backoff=(0.5, 5.0)))
        try:
            await _rounds(settings, args, receiver, device, out)
        finally:
            stop.set()
            await device
        return 0
    finally:
        if broker is not None:
            await broker.stop()
        shutil.rmtree(work, ignore_errors=True)  # the broker's files, and the device's unless --out


async def _rounds(settings, args, receiver, device, out):
    from transports import mqtt
    from transports.envelope import FULL, UPDATE

    from ..encoder.encoding import encode
    from ..updates import ChainState, encode_update, model_digest

    rng = np.random.default_rng(args.seed)
    train, test = make_data(rng)
    host = init_model(rng)
    params = sum(a.size for a in host.values())
    publisher = mqtt.Publisher(settings, args.model, max_message_bytes=args.max_message_bytes)
    out.write("host:   trains a %d-%d-%d perceptron (%s parameters, %s as float32) on synthetic data\n"
              % (FEATURES, HIDDEN, CLASSES, "{:,}".format(params), _size(4 * params)))
    out.write("device: keeps model %r in %s (MQTT messages of at most %d bytes)\n\n"
              % (args.model, receiver.store.path, args.max_message_bytes))
    out.write("%5s  %-14s  %8s  %8s  %10s  %8s  %10s  %s\n" % (
        "round", "published", "bytes", "messages", "full model", "host acc", "device acc", "device model"))
    device_view = chain = None
    sent = full_total = 0
    for round_ in range(args.rounds):
        host = train_round(host, train, rng)
        full = await asyncio.to_thread(encode, host)
        if device_view is None:
            kind, data = FULL, full
            device_view = await asyncio.to_thread(_decoded, full)
            chain = ChainState(model_digest(device_view))
        else:
            # The update codes what changed against the model the device has; the chain state
            # carries the quantization error over to the next round (error feedback).
            kind = UPDATE
            data, device_view = await asyncio.to_thread(encode_update, device_view, host, residual=chain,
                                                        return_model=True)
        status = await publisher.publish(data, kind)
        await _until_applied(receiver, device, status)
        device_model = modelio.load(receiver.store.path)
        same = list(device_model) == list(device_view) and all(
            np.array_equal(device_model[k].view(np.uint32), device_view[k].view(np.uint32)) for k in device_view)
        sent += len(data)
        full_total += len(full)
        out.write("%5d  %-14s  %8s  %8d  %10s  %7.1f%%  %9.1f%%  %s\n" % (
            round_, "%s %d" % ("full model" if kind == FULL else "update", status.seq), "{:,}".format(len(data)),
            status.counts[-1], "{:,}".format(len(full)), 100 * accuracy(host, test), 100 * accuracy(device_model, test),
            "= host's view, bit for bit" if same else "DIFFERS from the host's view"))
        if hasattr(out, "flush"):
            out.flush()
        if not same:
            raise DemoError("the device's model differs from the host's view of it after round %d" % round_)
    out.write("\n%d rounds: %s bytes of NNR bitstreams published (%s in MQTT messages with envelopes and status);\n"
              "a full model every round would have been %s bytes\n"
              % (args.rounds, "{:,}".format(sent), "{:,}".format(publisher.bytes_sent), "{:,}".format(full_total)))


def _decoded(data):
    from ..decoding import decode
    return decode(data)


async def _until_applied(receiver, device, status, timeout=60.0):
    deadline = time.monotonic() + timeout
    while receiver.store.version != (status.seq, status.digest):
        if device.done():
            device.result()  # raises what stopped the device task
            raise DemoError("the device task stopped")
        if time.monotonic() > deadline:
            raise DemoError("the device did not apply version %d within %g s: %s"
                            % (status.seq, timeout, "; ".join(receiver.events[-3:]) or "no message arrived"))
        await asyncio.sleep(0.02)


def _size(n):
    for unit in ("B", "KB", "MB"):
        if n < 1000 or unit == "MB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000.0
