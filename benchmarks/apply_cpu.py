"""CPU time of applying one silero-vad update on the device, and what of it the chain state costs.

    python benchmarks/apply_cpu.py [--qp -32] [--repeat 5] [--before REV]

Issue 16, finding 12: saving the chain state as a zlib-compressed .npz cost 0.12 s of CPU per
silero-vad update, twice the decode of the whole model. The state is now raw arrays behind a small
header (see nnc_edge/updates.py), read and written a slice at a time while the update decodes.

The chain is benchmarks/update_size.py's (5 % of each float32 tensor's elements moved by 1 % of its
std per step; TCA and HDSP); update 2 is measured, since it reads the state update 1 left. Printed,
each the best of ``--repeat`` runs of process CPU time (user + system):

- decode of the whole model (nnc_edge.decode of p1_real_silero_vad.nnc), for scale;
- decode of update 2 alone (decoder_core.StreamDecoder in slices, the chain state in memory);
- apply of update 2 from .safetensors to .safetensors (apply_update: digests, decode, patching the
  copy, both renames), and the part of it spent in the chain state's methods (reading the old state,
  writing the new one, completing and renaming the file); the same with ``nnc_edge/updates.py`` of git
  revision ``--before`` (default a7c6bd6: the .npz state loaded whole and saved compressed), run in a
  child process with the rest of this checkout (see apply_memory.before_package);
- the chain state after update 2 saved from memory: as the zlib .npz of revision a7c6bd6 (its
  ChainState.save, reproduced here) and as the raw file (ChainState.save now).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import update_size  # noqa: E402
from apply_memory import before_package  # noqa: E402
from stream_memory import run_child  # noqa: E402
import decoder_core  # noqa: E402
import nnc_edge  # noqa: E402
from nnc_edge import modelio, updates  # noqa: E402
from nnc_edge.sinks import NpzSink  # noqa: E402

SILERO = os.path.join(update_size.CONFORMANCE, "p1_real_silero_vad.nnc")

# argv: import paths (os.pathsep-separated), folder, repeat. The folder holds base.safetensors, u1.nnc
# and u2.nnc; prints the best process CPU time of applying u2 file to file after u1.
_APPLY = r"""
import json, os, shutil, sys, time
sys.path[:0] = sys.argv[1].split(os.pathsep)
from nnc_edge import updates
folder, repeat = sys.argv[2], int(sys.argv[3])
ready, device = os.path.join(folder, "ready"), os.path.join(folder, "device")
os.mkdir(ready)
shutil.copyfile(os.path.join(folder, "base.safetensors"), os.path.join(ready, "model.safetensors"))
updates.apply_update(os.path.join(ready, "model.safetensors"), os.path.join(folder, "u1.nnc"),
                     os.path.join(ready, "model.safetensors"))
times = []
for _ in range(repeat):
    shutil.rmtree(device, ignore_errors=True)
    shutil.copytree(ready, device)
    model = os.path.join(device, "model.safetensors")
    start = time.process_time()
    updates.apply_update(model, os.path.join(folder, "u2.nnc"), model)
    times.append(time.process_time() - start)
print(json.dumps({"seconds": min(times), "module": updates.__file__}))
"""


def best(repeat, run, prepare=None):
    """The least process CPU time of ``repeat`` calls of run() (prepare() before each, not timed)."""
    times = []
    for _ in range(repeat):
        if prepare is not None:
            prepare()
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return min(times)


def npz_save(state, path):
    """ChainState.save as of a7c6bd6: a zlib-compressed .npz."""
    meta = {"version": 1, "sequence": state.sequence, "root": state.root.hex(), "model": state.model.hex(),
            "encoder_depths": state.encoder_depths, "parameter_ids": state.parameter_ids}
    with NpzSink(path, compress=True) as sink:
        sink.write("meta", np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8))
        for prefix, group in (("bases", state.bases), ("history", state.history), ("residual", state.residual)):
            for name, array in group.items():
                sink.write(prefix + "/" + name, array)


class StateClock:
    """Process CPU time spent in the chain state's methods during an apply (wrapped while active)."""

    METHODS = ((updates._StateWriter, ("open", "save")),
               (updates._TensorState, ("read_base", "read_history", "write", "done")))

    def __init__(self):
        self.seconds = 0.0
        self.saved = []

    def __enter__(self):
        for cls, names in self.METHODS:
            for name in names:
                original = getattr(cls, name)
                self.saved.append((cls, name, original))
                setattr(cls, name, self._timed(original))
        return self

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start
        return timed

    def __exit__(self, *exc):
        for cls, name, original in self.saved:
            setattr(cls, name, original)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qp", type=int, default=-32, help="qp of the updates (default %(default)d)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (default %(default)d)")
    parser.add_argument("--before", default="a7c6bd6", metavar="REV",
                        help="git revision whose updates.py is run for comparison, or 'none' (default %(default)s)")
    args = parser.parse_args()
    with open(SILERO, "rb") as f:
        stream = f.read()
    model = nnc_edge.decode(stream)
    steps = list(update_size.chain(model, 2, args.qp, False))
    u1, u2 = steps[0][1], steps[1][1]
    view2 = steps[1][2]
    work = tempfile.mkdtemp(prefix="nnc-edge-apply-cpu-")
    try:
        # The device after update 1: the model file and its state file, copied afresh before each run.
        ready = os.path.join(work, "ready")
        os.mkdir(ready)
        modelio.save(os.path.join(ready, "model.safetensors"), model)
        updates.apply_update(os.path.join(ready, "model.safetensors"), u1, os.path.join(ready, "model.safetensors"))
        device = os.path.join(work, "device")
        target = os.path.join(device, "model.safetensors")

        def fresh():
            shutil.rmtree(device, ignore_errors=True)
            shutil.copytree(ready, device)

        whole = best(args.repeat, lambda: nnc_edge.decode(stream))
        _, after1 = updates.apply_update(model, u1, return_state=True)
        topology = updates.update_topology(model)

        decoders = []

        def new_decoder():
            decoders[:] = [decoder_core.StreamDecoder(topology, slice_elements=updates._REGION_BYTES // 4)]
            after1.restore_decoder(decoders[0].decoder)

        def decode_update():
            for _ in decoders[0].iter_feed(u2):
                pass
            decoders[0].close()

        decode = best(args.repeat, decode_update, new_decoder)
        clocks = []

        def apply():
            with StateClock() as clock:
                updates.apply_update(target, u2, target)
            clocks.append(clock.seconds)

        applying = best(args.repeat, apply, fresh)
        result = modelio.load(target)
        assert all(np.array_equal(result[k], view2[k]) for k in view2), "the device's model is not the host's view"
        _, after2 = updates.apply_update(steps[0][2], u2, state=after1, return_state=True)
        before = before_package(args.before, work) if args.before != "none" else None
        if before is not None:
            child = os.path.join(work, "child")
            os.mkdir(child)
            modelio.save(os.path.join(child, "base.safetensors"), model)
            for name, data in (("u1.nnc", u1), ("u2.nnc", u2)):
                with open(os.path.join(child, name), "wb") as f:
                    f.write(data)
            old = run_child(sys.executable, _APPLY, before + os.pathsep + REPO, child, args.repeat)
            if not old["module"].startswith(before):
                raise RuntimeError("the comparison ran %s" % old["module"])
        npz_path, raw_path = os.path.join(work, "state.npz"), os.path.join(work, "state.raw")
        npz = best(args.repeat, lambda: npz_save(after2, npz_path))
        raw = best(args.repeat, lambda: after2.save(raw_path))
        elements = sum(a.size for a in after2.bases.values())

        print("nnc-edge %s, decoder backend %s" % (nnc_edge.__version__, decoder_core.backend_name()))
        print("silero-vad: %d parameters; update 2 of a chain at qp %d: %d bytes; chain state: %d tensors, "
              "%d elements" % (sum(a.size for a in model.values()), args.qp, len(u2), len(after2.bases), elements))
        print()
        print("%-58s %8s" % ("process CPU time, best of %d" % args.repeat, "seconds"))
        rows = [("decode the whole model (p1_real_silero_vad.nnc)", whole),
                ("decode update 2 (slices, state in memory)", decode),
                ("apply update 2, file -> file, all of it", applying),
                ("  of which the chain state: read, write, complete, rename", min(clocks))]
        if before is not None:
            rows.append(("apply update 2, file -> file, before (%s)" % args.before, old["seconds"]))
        rows += [
                ("save the state after update 2, before: zlib .npz (%d B)" % os.path.getsize(npz_path), npz),
                ("save the state after update 2, now: raw (%d B)" % os.path.getsize(raw_path), raw)]
        for label, seconds in rows:
            print("%-58s %8.4f" % (label, seconds))
        print()
        print("finding 12 (the state's save must cost less CPU than decoding the update): in apply %.4f s vs %.4f s "
              "decode: %s" % (min(clocks), decode, "met" if min(clocks) < decode else "MISSED"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
