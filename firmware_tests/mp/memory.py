# MicroPython: stream one bitstream through decoder_core with asyncio inside a fixed GC heap.
#
#   memory.py EXPECT.json HEAP_BYTES [--chunk BYTES]
#
# A reader task reads the bitstream (EXPECT.json's "nnc", next to it) in chunks and hands them over
# through a one-slot queue; the decoder task feeds them to StreamDecoder.feed() and passes every
# tensor to a callback, which checks it against the expectation (CRC-32 of its bytes, as a device
# would check what it writes to flash) and drops it. The heap must never grow beyond HEAP_BYTES.
# Prints the gc.mem_free() low-water mark; exits with status 1 on any difference or if the heap
# was too small.
from heap import HeapTooSmall, Meter, io_wait  # first: the heap is measured before anything else is loaded

import asyncio  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from decoder_core.stream import StreamDecoder  # noqa: E402
from expect import load, mismatch  # noqa: E402


class ChunkQueue:
    """A one-slot queue (MicroPython's asyncio has no Queue)."""

    def __init__(self):
        self.item = None
        self.full = False
        self.put_done = asyncio.Event()
        self.get_done = asyncio.Event()

    async def put(self, item):
        while self.full:
            self.get_done.clear()
            await self.get_done.wait()
        self.item = item
        self.full = True
        self.put_done.set()

    async def get(self):
        while not self.full:
            self.put_done.clear()
            await self.put_done.wait()
        item = self.item
        self.item = None
        self.full = False
        self.get_done.set()
        return item


async def reader(path, chunk_size, queue, stats):
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            await io_wait()
            await queue.put(chunk)
            if not chunk:
                return
            stats["chunks"] += 1


async def decoder(queue, on_tensor, meter):
    dec = StreamDecoder()
    while True:
        chunk = await queue.get()
        if not chunk:
            break
        tensors = dec.feed(chunk)
        chunk = None
        meter.check("feed() of byte %d" % dec.bytes)
        while tensors:
            # Hand each tensor over and drop it: nothing here keeps a reference afterwards.
            t = tensors.pop(0)
            on_tensor(t[0], t[1], t[2])
            t = None
            gc.collect()
        tensors = None
    dec.close()


async def main(expect_path, heap, chunk_size):
    meter = Meter(heap)
    exp = load(expect_path)
    base = expect_path[:expect_path.rfind("/") + 1]
    expected = exp["tensors"]
    stats = {"chunks": 0, "tensors": 0, "params": 0, "errors": []}

    def on_tensor(name, shape, values):
        meter.check("tensor %s" % name)
        k = stats["tensors"]
        if k >= len(expected):
            stats["errors"].append("unexpected tensor %s" % name)
        else:
            m = mismatch(expected[k], name, shape, values)
            if m:
                stats["errors"].append(m)
        stats["tensors"] = k + 1
        stats["params"] += len(values)

    queue = ChunkQueue()
    t0 = time.ticks_ms()
    try:
        await asyncio.gather(reader(base + exp["nnc"], chunk_size, queue, stats),
                             decoder(queue, on_tensor, meter))
    except HeapTooSmall as e:
        print("memory: FAIL %s" % e)
        return False
    ms = time.ticks_diff(time.ticks_ms(), t0)
    meter.check("the end")
    if stats["tensors"] != len(expected):
        stats["errors"].append("%d tensors decoded, %d expected" % (stats["tensors"], len(expected)))
    for m in stats["errors"]:
        print("memory: FAIL %s" % m)
    print("memory: %s: %d tensors, %d parameters %s in %d ms; %d chunks of %d bytes; heap %d bytes "
          "(%d usable); gc.mem_free() low-water %d bytes (at %s); peak gc.mem_alloc() %d bytes"
          % (exp["name"], stats["tensors"], stats["params"], "bit-exact" if not stats["errors"] else "WRONG",
             ms, stats["chunks"], chunk_size, heap, meter.capacity, meter.low, meter.where, meter.peak))
    return not stats["errors"]


def parse_args(argv):
    if len(argv) < 3:
        raise SystemExit("usage: memory.py EXPECT.json HEAP_BYTES [--chunk BYTES]")
    chunk = 4096
    if len(argv) >= 5 and argv[3] == "--chunk":
        chunk = int(argv[4])
    return argv[1], int(argv[2]), chunk


EXPECT, HEAP, CHUNK = parse_args(sys.argv)
if not await main(EXPECT, HEAP, CHUNK):  # noqa: F704  (run.mjs allows top-level await)
    sys.exit(1)
