"""Heap accounting for the MicroPython memory scripts (memory.py, store_memory.py): import it first.

The WebAssembly port's heap grows instead of failing an allocation (MicroPython's automatic split
heap), and gc.mem_free() counts the 128 MiB it may still add. The heap the runner asked for is the
first region: growing past it means a device with that heap would have run out of memory. The port
never collects garbage to make room for an allocation (it grows the heap instead), and a
gc.collect() frees only what was garbage when control was last back in JavaScript (at an await, or
between the calls run.mjs --loop makes), not what the running code made since. So between two
returns to JavaScript every allocation, garbage included, has to fit: a stricter test than a
board, which collects whenever the heap is full.
"""

import gc
import sys

WASM = sys.platform == "webassembly"
GROWTH_RESERVE = (128 << 20) if WASM else 0
TOTAL = gc.mem_alloc() + gc.mem_free()

if WASM:
    import js

    def io_wait():
        # Where a device's reader waits for its UART or socket. Awaiting a JavaScript promise
        # returns control to JavaScript, where this port runs its GC.
        return js.Promise.resolve(None)
else:
    import asyncio

    def io_wait():
        return asyncio.sleep_ms(0)


async def collect():
    """Collect garbage, on this port too (see the module docstring)."""
    await io_wait()
    gc.collect()


class HeapTooSmall(Exception):
    pass


class Meter:
    """gc.mem_free() low-water mark and gc.mem_alloc() peak at the checkpoints; fails if the heap grew.
    ``total``: gc.mem_alloc() + gc.mem_free() when the script started, if it imported this module
    later (by default, when this module was imported)."""

    def __init__(self, heap, total=TOTAL):
        self.total = total
        self.capacity = total - GROWTH_RESERVE
        if not (heap * 9 // 10 <= self.capacity <= heap):
            raise SystemExit("heap accounting: %d usable bytes for a %d-byte heap (port changed?)"
                             % (self.capacity, heap))
        self.low = self.capacity
        self.peak = 0
        self.where = None

    def check(self, where):
        alloc = gc.mem_alloc()
        free = gc.mem_free()
        if alloc + free != self.total:
            raise HeapTooSmall("the heap grew from %d to %d bytes at %s: %d bytes are not enough"
                               % (self.capacity, alloc + free - GROWTH_RESERVE, where, self.capacity))
        if free - GROWTH_RESERVE < self.low:
            self.low = free - GROWTH_RESERVE
            self.where = where
        if alloc > self.peak:
            self.peak = alloc
