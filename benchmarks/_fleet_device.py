"""A worker process of benchmarks/fleet.py: many simulated devices as asyncio tasks in one process.

Each device is the real device service, as ``nnc-edge receive --id DEVICE`` runs it:
``transports.mqtt.run_receiver(settings, Receiver(ModelStore(DIR/DEVICE, MODEL), device_id=DEVICE))``,
its own directory, its own MQTT connection (client id ``nnc-edge-DEVICE``, last will, reports).

    python benchmarks/_fleet_device.py SPEC_JSON

SPEC: {"broker": URL, "model": NAME, "root": DIR, "ids": [...], "gap_timeout": S (optional),
       "health_check": CMD (optional: every device runs it after each new model, as with
       ``nnc-edge receive --health-check CMD``)}

Protocol with the host, one JSON object per line on stdout: first ``{"ready": ...}`` once every
device is connected and subscribed (with the RSS and CPU measured after the imports, before any
device existed), then ``{"final": ...}`` after stdin is closed and every device has stopped.
``applied`` maps each device to {seq: wall-clock time its model file was replaced}. The host
reads this process's CPU and memory from /proc itself, so it can sample a worker it then SIGKILLs.
Logs (logger nnc_edge.mqtt, INFO) go to stderr.
"""

import asyncio
import json
import logging
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from mqtt_e2e import rss  # noqa: E402


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def _preload():
    # Everything a device loads on first use, so that the RSS measured next is the imports' and the
    # growth after it is the devices'.
    import aiomqtt  # noqa: F401
    import numpy  # noqa: F401

    import nnc_edge  # noqa: F401
    from nnc_edge import modelio, sinks, streaming, updates  # noqa: F401
    from transports import mqtt, report  # noqa: F401


def make_receiver(mqtt, spec, device_id, on_applied):
    """The device's Receiver, as ``nnc-edge receive --id DEVICE [--health-check CMD]`` makes it."""
    store = mqtt.ModelStore(os.path.join(spec["root"], device_id), spec["model"])
    options = {}
    if spec.get("health_check"):
        from transports.mqtt.health import HealthCheck
        options["health_check"] = HealthCheck(spec["health_check"])
    return mqtt.Receiver(store, gap_timeout=spec.get("gap_timeout", 30.0), device_id=device_id,
                         on_applied=on_applied, **options)


async def main(spec):
    from transports import mqtt
    settings = mqtt.BrokerSettings(spec["broker"])
    applied = {}
    receivers = {}
    stop = asyncio.Event()

    def on_applied_for(device_id):
        def on_applied(env):
            applied.setdefault(device_id, {})[env.seq] = time.time()
        return on_applied

    tasks = []
    for device_id in spec["ids"]:
        rx = make_receiver(mqtt, spec, device_id, on_applied_for(device_id))
        receivers[device_id] = rx
        tasks.append(asyncio.ensure_future(mqtt.run_receiver(settings, rx, stop)))
    deadline = time.monotonic() + spec.get("connect_timeout", 120.0)
    while not all(rx.connected and rx.reported is not None for rx in receivers.values()):
        if time.monotonic() > deadline:
            missing = [d for d, rx in receivers.items() if not rx.connected]
            raise SystemExit("devices not connected after %g s: %s" % (spec.get("connect_timeout", 120.0),
                                                                        ", ".join(missing[:10])))
        for t in tasks:
            if t.done():
                t.result()
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": {"devices": len(receivers), "connected_at": time.time()}}), flush=True)

    # The host closes stdin to stop the devices (SIGKILL needs no cooperation).
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def wait_stdin():  # its own thread: the default executor is the devices' (asyncio.to_thread)
        sys.stdin.read()
        loop.call_soon_threadsafe(closed.set)
    threading.Thread(target=wait_stdin, daemon=True).start()
    await closed.wait()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    final = {d: {"version": rx.store.version[0] if rx.store.version else 0, "state": rx.report_state(),
                 "events": list(rx.events)[-3:]} for d, rx in receivers.items()}
    print(json.dumps({"final": final, "applied": applied}), flush=True)


def run():
    spec = json.loads(sys.argv[1])
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nnc_edge.mqtt.paho").setLevel(logging.CRITICAL)
    _preload()
    baseline = {"rss": rss(), "cpu": cpu_seconds(), "pid": os.getpid()}
    print(json.dumps({"baseline": baseline}), flush=True)
    asyncio.run(main(spec))


if __name__ == "__main__":
    run()
