# MicroPython: nnc_device.agent on a real MQTT connection (run.mjs --mqtt), inside a fixed GC heap.
#
#   node run.mjs --heap HEAP --mqtt URL --persist DIR=/flash --loop step agent_device.py \
#       HEAP MODEL DEVICE_ID PUBLIC_KEY.pem [--measure] [--message-bytes N]
#
# run.mjs calls step() once per event, as store_memory.py: this port collects garbage only between
# calls. The first steps import what the agent needs (the decoder, the store, the agent, the
# signature check, the MQTT adapter) and measure gc.mem_alloc() before and after: with --measure the
# script prints the figures and stops (the test then gives the real run a heap of that size plus
# 64 KiB). Then each step is one agent.step() after gc.collect(), and the heap must never grow
# beyond HEAP (heap.Meter). Prints "agent memory: ..." lines; exits with status 1 when the heap
# grew.
import gc
import sys

TOTAL = gc.mem_alloc() + gc.mem_free()
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
MEASURE = "--measure" in sys.argv
# Bytes of a message decoded per step: everything one step allocates, garbage included, must fit.
FEED_BYTES = 64
SLICE_ELEMENTS = 256
# phase, heap in use before the imports, after them, peak beyond them, largest live state between
# steps, largest allocation of one step
S = [0, 0, 0, 0, 0, 0]
R = {}


# What the agent imports, one module a step (a step's allocations must fit the heap too).
IMPORTS = ("decoder_core.stream", "nnc_device.store", "nnc_device.agent", "transports.ed25519", "transports.report",
           "jsmqtt")


def step():
    gc.collect()
    S[0] += 1
    if S[0] == 1:
        S[1] = gc.mem_alloc()
        return True
    if S[0] <= 1 + len(IMPORTS):
        __import__(IMPORTS[S[0] - 2])
        return True
    if S[0] == 2 + len(IMPORTS):
        S[2] = gc.mem_alloc()
        print("agent memory: before the imports %d bytes, imports %d bytes, in use after them %d bytes"
              % (S[1], S[2] - S[1], S[2]))
        if MEASURE:
            return False
        import heap  # noqa: F401  (the harness, after the measurement)
        return True
    if S[0] == 3 + len(IMPORTS):
        return start()
    return agent_step()


def start():
    from heap import Meter
    from jsmqtt import MQTTClient
    from nnc_device.agent import Agent, client_id
    heap_bytes, model, device_id, key = int(ARGS[0]), ARGS[1], ARGS[2], ARGS[3]
    R["meter"] = Meter(heap_bytes, TOTAL)
    with open(key) as f:
        pem = f.read()
    agent = Agent(MQTTClient(client_id(device_id), None), model, "/flash", device_id, trusted_keys=[pem],
                  feed_bytes=FEED_BYTES, slice_elements=SLICE_ELEMENTS)
    pem = None
    R["agent"] = agent
    agent.start()
    return True


def agent_step():
    from heap import HeapTooSmall
    a = R["agent"]
    live = gc.mem_alloc() - S[2]  # what lives between steps, beyond the imports (step() collected)
    busy = a.step()
    step = gc.mem_alloc() - S[2] - live  # what this step allocated, garbage included
    m = R["meter"]
    try:
        m.check(S[0])
    except HeapTooSmall as e:
        asm = a.assembly
        print("agent memory: FAIL %s (agent: %s, target %s, %d bodies queued, %s, %s)"
              % (e, a.state, a.target, len(a.bodies),
                 "no publication" if asm is None else "assembling %s, message %d of %d" % (asm.first.describe(),
                                                                                        asm.next, asm.first.count),
                 "verifying a signature" if a.verifying is not None else "decoding" if a.session else "idle"))
        raise SystemExit(1)
    if live > S[4] or step > S[5] or m.peak - S[2] > S[3]:
        S[3], S[4], S[5] = max(S[3], m.peak - S[2]), max(S[4], live), max(S[5], step)
        print("agent memory: peak %d bytes beyond the imports (live between steps up to %d, one step's "
              "allocations up to %d), gc.mem_free() low-water %d bytes" % (S[3], S[4], S[5], m.low))
    return True if busy else 2
