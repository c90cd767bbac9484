"""Peak memory of streaming decoding: MiniLM from a file into a .safetensors sink, against NNCodec.

    python benchmarks/stream_memory.py [--reference-venv /tmp/refvenv] [--chunk-size 65536]

Every measurement runs in a fresh process. The baseline is the process's RSS after its imports;
the peak RSS is reset to it (Linux: /proc/self/clear_refs) and read back (VmHWM) after decoding,
so "growth" is what decoding added at its worst moment. Measured:

- nnc-edge: nnc_edge.iter_decode(path) into nnc_edge.sinks.SafetensorsSink, for the MiniLM stream
  (benchmarks/_minilm.py, NNCodec qp -32 with DQ) and for a model twice as large (the same NDUs
  twice, the second copy renamed with nnc_edge.unitwriter), to show the growth follows the largest
  tensor, not the model;
- NNCodec 2.1.3 ``nnc.decompress(path)`` on the same two streams, in the reference venv;
- ``import nnc_edge``: RSS of a fresh interpreter after the import.

Target (issue 5): growth <= 1.5 x the largest tensor (44.7 MiB for MiniLM) + 16 MiB; import < 60 MB.

Recorded on the development machine (x86_64, CPython 3.11.7, Cython backend, 2 cores shared with
other jobs, so the times vary):

    stream:   all-minilm-l6-v2_qp-32_dq_scan0_v2.nnc (13.4 MiB); x2: all-minilm-l6-v2_qp-32_dq_scan0_v2_x2.nnc (26.7 MiB)
    largest tensor: embeddings.word_embeddings.weight [30522, 384] float32, 44.7 MiB
    target: peak RSS growth <= 1.5 x 44.7 MiB + 16 MiB = 83.1 MiB

    decoder                          model      tensors  baseline      peak    growth x tensor     time
    nnc-edge stream -> .safetensors  MiniLM         104  29.7 MiB  81.3 MiB  51.6 MiB     1.15   3.70 s
    NNCodec 2.1.3 decompress         MiniLM         104 411.3 MiB 600.4 MiB 189.1 MiB     4.23   4.74 s
    nnc-edge stream -> .safetensors  MiniLM x2      208  29.6 MiB  81.7 MiB  52.1 MiB     1.17   6.90 s
    NNCodec 2.1.3 decompress         MiniLM x2      208 411.8 MiB 788.1 MiB 376.2 MiB     8.41  12.39 s

    nnc-edge growth: 52.1 MiB at most -> within the target of 83.1 MiB
    import nnc_edge: RSS 28.8 MiB (bare interpreter 13.4 MiB) -> under 60 MB
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import _minilm  # noqa: E402

MIB = float(1 << 20)

# Shared by both children (ours and NNCodec's): RSS from /proc and a reset of the peak.
_PROBE = r"""
def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False
"""

_OURS = _PROBE + r"""
import json, sys, time
sys.path.insert(0, sys.argv[4])
import nnc_edge
from nnc_edge.sinks import SafetensorsSink
src, dst, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
largest = [0, None, None]

def watch(items):
    for item in items:
        if item[1].nbytes > largest[0]:
            largest[:] = [item[1].nbytes, item[0], list(item[1].shape)]
        yield item
        item = None

base = _status("VmRSS")
reset = _reset_peak()
start = time.perf_counter()
with SafetensorsSink(dst) as sink:
    count = sink.write_all(watch(nnc_edge.iter_decode(src, chunk)))
elapsed = time.perf_counter() - start
print(json.dumps({"base": base, "peak": _status("VmHWM"), "reset": reset, "seconds": elapsed,
                  "tensors": count, "largest": largest}))
"""

_NNCODEC = _PROBE + r"""
import json, sys, time
from nncodec import nnc
base = _status("VmRSS")
reset = _reset_peak()
start = time.perf_counter()
params = nnc.decompress(sys.argv[1])
elapsed = time.perf_counter() - start
print(json.dumps({"base": base, "peak": _status("VmHWM"), "reset": reset, "seconds": elapsed,
                  "tensors": len(params), "parameters": int(sum(v.size for v in params.values()))}))
"""

_IMPORT = _PROBE + r"""
import json, sys
bare = _status("VmRSS")
sys.path.insert(0, sys.argv[1])
import nnc_edge
print(json.dumps({"bare": bare, "rss": _status("VmRSS"), "peak": _status("VmHWM")}))
"""


def run_child(python, code, *args):
    out = subprocess.run([python, "-c", code] + [str(a) for a in args], check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def doubled_stream(path):
    """The MiniLM stream with its NDUs repeated under the names "copy2.<name>": one bitstream
    (STR, MPS, TPL, 2 x 104 NDUs) of a model twice as large. Cached next to the original."""
    out = os.path.splitext(path)[0] + "_x2.nnc"
    if os.path.exists(out):
        return out
    from decoder_core.tables import NNR_NDU
    from decoder_core.units import ParserState, parse_unit
    from nnc_edge import unitwriter

    with open(path, "rb") as f:
        data = f.read()
    state = ParserState()
    head, ndus, renamed = [], [], []
    offset = 0
    while offset < len(data):
        unit = parse_unit(data, offset, len(data), state)
        raw = data[offset:offset + unit.nnr_unit_size]
        if unit.nnr_unit_type != NNR_NDU:
            head.append(raw)
        else:
            ndu = unit.ndu
            if ndu.get("nnr_multiple_topology_elements_present_flag") or unit.partial_data_counter:
                raise RuntimeError("unexpected NDU layout at byte %d" % offset)
            ndus.append(raw)
            ndu.topology_elem_id = "copy2." + ndu.topology_elem_id
            header = unitwriter.compressed_data_unit_header(ndu, general_profile_idc=unit.general_profile_idc,
                                                            mps=state.mps)
            renamed.append(unitwriter.nnr_unit(NNR_NDU, header, data[unit.payload_start:unit.payload_end]))
        offset += unit.nnr_unit_size
    with open(out + ".part", "wb") as f:
        for raw in head + ndus + renamed:
            f.write(raw)
    os.replace(out + ".part", out)
    return out


def mib(n):
    return n / MIB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-venv", default=_minilm.DEFAULT_VENV,
                        help="NNCodec 2.1.3 venv, for encoding the stream and for the comparison (default %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=1 << 16, help="bytes per read (default %(default)d)")
    args = parser.parse_args()

    single = _minilm.minilm_stream(0, args.reference_venv)
    double = doubled_stream(single)
    reference = _minilm.reference_python(args.reference_venv)
    work = tempfile.mkdtemp(prefix="nnc-edge-stream-memory-")

    rows = []
    largest = None
    for label, path in (("MiniLM", single), ("MiniLM x2", double)):
        ours = run_child(sys.executable, _OURS, path, os.path.join(work, "out.safetensors"), args.chunk_size, REPO)
        if label == "MiniLM":
            largest = ours["largest"]
            check_output(path, os.path.join(work, "out.safetensors"))
        os.remove(os.path.join(work, "out.safetensors"))
        rows.append(("nnc-edge stream -> .safetensors", label, path, ours))
        if reference is not None:
            rows.append(("NNCodec 2.1.3 decompress", label, path, run_child(reference, _NNCODEC, path)))
    os.rmdir(work)
    imp = run_child(sys.executable, _IMPORT, REPO)

    nbytes, name, shape = largest
    target = 1.5 * nbytes + 16 * MIB
    print("stream:   %s (%.1f MiB); x2: %s (%.1f MiB)" % (os.path.basename(single), mib(os.path.getsize(single)),
                                                        os.path.basename(double), mib(os.path.getsize(double))))
    print("largest tensor: %s %s float32, %.1f MiB" % (name, shape, mib(nbytes)))
    print("target: peak RSS growth <= 1.5 x %.1f MiB + 16 MiB = %.1f MiB" % (mib(nbytes), mib(target)))
    print()
    print("%-32s %-10s %7s %9s %9s %9s %8s %8s" % ("decoder", "model", "tensors", "baseline", "peak", "growth",
                                                     "x tensor", "time"))
    for who, label, path, r in rows:
        growth = r["peak"] - r["base"]
        print("%-32s %-10s %7d %5.1f MiB %5.1f MiB %5.1f MiB %8.2f %6.2f s%s"
              % (who, label, r["tensors"], mib(r["base"]), mib(r["peak"]), mib(growth), growth / float(nbytes),
                 r["seconds"], "" if r["reset"] else "  (peak not reset: includes imports)"))
    if reference is None:
        print("(NNCodec not measured: no reference venv at %s)" % args.reference_venv)
    ours = [r for who, _, _, r in rows if who.startswith("nnc-edge")]
    worst = max(r["peak"] - r["base"] for r in ours)
    print()
    print("nnc-edge growth: %.1f MiB at most -> %s the target of %.1f MiB"
          % (mib(worst), "within" if worst <= target else "OVER", mib(target)))
    print("import nnc_edge: RSS %.1f MiB (bare interpreter %.1f MiB) -> %s 60 MB"
          % (mib(imp["rss"]), mib(imp["bare"]), "under" if imp["rss"] < 60e6 else "OVER"))


def check_output(stream, written):
    """The streamed file holds exactly what the whole-buffer decoder returns (not timed or measured)."""
    import numpy as np
    import nnc_edge
    from nnc_edge import modelio

    want = nnc_edge.decode(stream)
    got = modelio.load(written)
    if list(got) != list(want) or not all(np.array_equal(got[k], want[k]) for k in want):
        raise SystemExit("streamed output differs from nnc_edge.decode")


if __name__ == "__main__":
    main()
