# MicroPython: decoding speed of decoder_core on one bitstream held in memory.
#
#   speed.py FILE.nnc [REPEAT]
#
# Prints one line per run and a final "speed: PARAMS parameters, best MS ms, CRC" line; CRC is the
# CRC-32 of all tensors' bytes in stream order, for comparison with another interpreter's output.
import binascii
import gc
import sys
import time

import decoder_core

path = sys.argv[1]
repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 1
with open(path, "rb") as f:
    data = f.read()
best = None
params = 0
crc = 0
for run in range(repeat):
    out = None
    gc.collect()
    t0 = time.ticks_us()
    out = decoder_core.decode(data)
    us = time.ticks_diff(time.ticks_us(), t0)
    params = 0
    crc = 0
    for name, shape, values in out:
        params += len(values)
        crc = binascii.crc32(values, crc)
    print("run %d: %d us" % (run + 1, us))
    if best is None or us < best:
        best = us
# REPEAT 0 loads everything but decodes nothing: the baseline of the benchmark's CPU-time measurement.
print("speed: %d parameters, best %d us, crc32 %08x, %s" % (params, best or 0, crc & 0xFFFFFFFF, sys.version))
