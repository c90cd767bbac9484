# MicroPython: bitstreams streamed into the device store (nnc_device.store) one after the other.
#
#   store.py [--chunk BYTES] STEP...
#
# STEP is @DIR, the store the following steps go to; the path of a bitstream, stored with
# store_stream() (an update when it carries an update record); or !PATH for one that must fail with
# NNCError and leave the store exactly as it was. After each stored bitstream the committed index is
# printed, one line per tensor with the CRC-32 of its file, for the CPython side to compare with
# the reference:
#
#   stored PATH generation G sequence S digest HEX
#   tensor NAME DTYPE D0xD1x... CRC32
#   refused PATH ErrorClass: message
import binascii
import os
import sys

from decoder_core.errors import NNCError
from nnc_device.store import read_index, store_stream


def crc_of(path, buf):
    crc = 0
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return crc
            crc = binascii.crc32(memoryview(buf)[:n], crc)


def snapshot(directory, buf):
    """Every file in the directory with the CRC-32 of its bytes."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted((name, crc_of(directory + "/" + name, buf)) for name in names)


def show(directory, path, buf):
    index = read_index(directory)
    print("stored %s generation %d sequence %d digest %s"
          % (path, index["generation"], index["sequence"], index["digest"]))
    for t in index["tensors"]:
        shape = "x".join(str(d) for d in t["shape"])
        print("tensor %s %s %s %08x" % (t["name"], t["dtype"], shape or "-", crc_of(directory + "/" + t["file"], buf)))


def main(argv):
    directory = None
    chunk = 1024
    steps = argv[1:]
    if steps[:1] == ["--chunk"]:
        chunk = int(steps[1])
        steps = steps[2:]
    buf = bytearray(1024)
    for step in steps:
        if step.startswith("@"):
            directory = step[1:]
            continue
        must_fail = step.startswith("!")
        path = step[1:] if must_fail else step
        before = snapshot(directory, buf) if must_fail else None
        try:
            with open(path, "rb") as f:
                store_stream(f, directory, chunk_size=chunk)
        except NNCError as e:
            if not must_fail:
                raise
            after = snapshot(directory, buf)
            if after != before:
                print("FAIL %s changed the store: %r -> %r" % (path, before, after))
                return 1
            print("refused %s %s: %s" % (path, type(e).__name__, e))
            continue
        if must_fail:
            print("FAIL %s was stored" % path)
            return 1
        show(directory, path, buf)
    return 0


sys.exit(main(sys.argv))
