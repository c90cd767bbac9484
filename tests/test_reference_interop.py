"""Our encoder against the reference implementation, NNCodec 2.1.3 (never a dependency of the project).

With the reference venv (/tmp/refvenv, or $NNC_REFERENCE_VENV; ../shared/tools/reference-venv.sh DIR
creates one) this module runs NNCodec once, in a subprocess of the venv's python, on a batch of jobs:

* NNCodec's ``decompress`` decodes our streams bit-exactly as our decoder does: profiles 0 and 1,
  dq on/off, every scan order, codebooks, bit depth, row skipping, integer tensors, raw floats, a
  real model (silero-vad) and an update chain with parent signalling and TCA;
* rate-distortion: for the same tensors and qp, ``nnc.compress`` (its defaults besides qp / use_dq)
  and our ``nnc_edge.encode`` (ours) are compared; our stream is no larger (no tolerance is needed:
  with the same levels the coding is byte-identical, and our encoder only deviates where that saves
  bytes) and our MSE is no higher.

Without the venv the module is skipped with the reason.
"""

import json
import os
import subprocess

import numpy as np
import pytest

import nnc_edge
from conftest import CONFORMANCE_DIR
from decoder_core.tables import NNR_NDU, NNR_PT_RAW_FLOAT
from nnc_edge.cli.decode import iter_units
from nnc_edge.encoder.encoding import Encoder

REFERENCE_VENV = os.environ.get("NNC_REFERENCE_VENV", "/tmp/refvenv")
REFERENCE_PYTHON = os.path.join(REFERENCE_VENV, "bin", "python")

pytestmark = pytest.mark.skipif(
    not os.path.exists(REFERENCE_PYTHON),
    reason="NNCodec reference venv not found at %s (create one with ../shared/tools/reference-venv.sh DIR and "
           "set NNC_REFERENCE_VENV=DIR); the reference is never a dependency" % REFERENCE_VENV)

# Runs inside the reference venv. Jobs: decode a stream, decode a chain of streams with one base
# state, or compress a dict of tensors; outputs are .npz / .nnc files.
REFERENCE_SCRIPT = r'''
import json, sys
import numpy as np
from nncodec import nnc

def save(path, params):
    np.savez(path, **{k: np.asarray(v) for k, v in params.items()})

for job in json.load(open(sys.argv[1])):
    sys.stderr.write("job %s\n" % job["label"])
    kind = job["kind"]
    if kind == "decode":
        save(job["out"], nnc.decompress(job["path"]))
    elif kind == "chain":
        base = {"parameters": {}, "put_node_depth": {}, "device_id": 0, "parameter_id": {}}
        for path, out in zip(job["paths"], job["outs"]):
            save(out, nnc.decompress(path, approx_param_base=base, update_base_param=True))
    else:
        with np.load(job["tensors"]) as f:
            params = {k: f[k] for k in f.files}
        stream = nnc.compress(params, bitstream_path=None, return_bitstream=True, verbose=False, **job["args"])
        with open(job["out"], "wb") as f:
            f.write(stream)
'''


def rng(seed):
    return np.random.default_rng(seed)


def laplace(seed, shape, scale):
    return (rng(seed).laplace(size=shape) * scale).astype(np.float32)


def random_model(seed):
    return {"fc1.weight": laplace(seed, (40, 37), 0.05), "fc1.bias": laplace(seed + 1, (40,), 0.01),
            "conv.weight": laplace(seed + 2, (24, 3, 3, 3), 0.2), "fc2.weight": laplace(seed + 3, (19, 64), 0.1),
            "ids": rng(seed + 4).integers(-300, 300, size=(6, 5)).astype(np.int32)}


def silero():
    path = CONFORMANCE_DIR / "p1_real_silero_vad.nnc"
    if not path.exists():
        pytest.skip("conformance vectors not found in %s" % CONFORMANCE_DIR)
    return dict(nnc_edge.decode(str(path)))


class Batch:
    """Collects jobs, runs NNCodec once, hands back its outputs."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.jobs = []
        self.results = None

    def path(self, stem, suffix):
        return str(self.tmp / ("%s_%d%s" % (stem, len(self.jobs), suffix)))

    def decode(self, data, label):
        path = self.path(label, ".nnc")
        with open(path, "wb") as f:
            f.write(data)
        job = {"kind": "decode", "path": path, "out": self.path(label, ".npz"), "label": label}
        self.jobs.append(job)
        return job

    def chain(self, streams, label):
        paths = []
        for i, data in enumerate(streams):
            path = self.path("%s_step%d" % (label, i), ".nnc")
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        job = {"kind": "chain", "paths": paths, "outs": [p[:-4] + ".npz" for p in paths], "label": label}
        self.jobs.append(job)
        return job

    def compress(self, tensors, label, **args):
        path = self.path(label, ".npz")
        np.savez(path, **tensors)
        job = {"kind": "compress", "tensors": path, "args": args, "out": self.path(label, ".nnc"), "label": label}
        self.jobs.append(job)
        return job

    def run(self):
        script = self.tmp / "reference.py"
        script.write_text(REFERENCE_SCRIPT)
        jobs = self.tmp / "jobs.json"
        jobs.write_text(json.dumps(self.jobs))
        proc = subprocess.run([REFERENCE_PYTHON, str(script), str(jobs)], capture_output=True, text=True,
                              timeout=900, cwd=str(self.tmp))
        assert proc.returncode == 0, proc.stderr[-3000:]


def ndus(data):
    return [u for _, u, _ in iter_units(data) if u.nnr_unit_type == NNR_NDU]


def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_same_as_ours(theirs, ours, label):
    """NNCodec's decoding equals ours bit for bit (its float64 codebook values, 4.3, as float32)."""
    assert sorted(theirs) == sorted(ours), label
    for name, want in ours.items():
        have = theirs[name]
        if want.dtype == np.int32:
            assert have.dtype.kind == "i" and np.array_equal(have.reshape(want.shape), want), (label, name)
        else:
            have = have.astype(np.float32).reshape(want.shape)
            assert np.array_equal(have.view(np.uint32), want.view(np.uint32)), (label, name)


# --- the batch -----------------------------------------------------------------------------------------
DECODE_CASES = []
for _profile in (0, 1):
    for _dq in (True, False):
        for _scan in (0, 1, 2, 3):
            DECODE_CASES.append(("p%d_dq%d_scan%d" % (_profile, _dq, _scan), _profile,
                                 dict(dq=_dq, scan_order=_scan, qp=-34)))
    for _mode in (1, 2):
        DECODE_CASES.append(("p%d_codebook%d" % (_profile, _mode), _profile, dict(codebook=_mode, qp=-30)))
    DECODE_CASES.append(("p%d_bitdepth4" % _profile, _profile, dict(bitdepth=4, raw_float=False)))
DECODE_CASES += [
    ("p1_rowskip_scan0", 1, dict(zero_rows=True)),
    ("p1_rowskip_scan1_dq", 1, dict(zero_rows=True, scan_order=1)),
    ("p1_raw_float", 1, dict(scalars=True)),
    ("p1_lambda", 1, dict(lambda_scale=1.0, qp=-38)),
    ("p1_unary2", 1, dict(cabac_unary_length_minus1=2, qp=-40)),
    ("p0_nonweight_none", 0, dict(nonweight_qp=None, qp_density=3, qp=-60)),
]

RD_QPS = (-38, -32, -26)


def case_tensors(options, seed):
    tensors = random_model(seed)
    options = dict(options)
    if options.pop("zero_rows", False):
        for name in ("fc1.weight", "fc2.weight"):
            tensors[name][::3] = 0
        tensors["fc2.weight"] = np.ascontiguousarray(tensors["fc2.weight"][:, :63])  # w % 4 != 0
    if options.pop("scalars", False):
        # NNR_PT_RAW_FLOAT: NNCodec 2.1.3 decodes it, but its byte counter becomes a float64 there
        # (BitReader.flt_tensor), so it fails on any unit after one; ours is the last.
        tensors["gain"] = np.array([0.75], np.float32)
    return tensors, options


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Everything NNCodec has to do for this module, in one subprocess."""
    tmp = tmp_path_factory.mktemp("nncodec")
    batch = Batch(tmp)
    expected = {}
    for i, (label, profile, options) in enumerate(DECODE_CASES):
        tensors, options = case_tensors(options, 10 * i)
        data = Encoder(profile=profile).encode(tensors, **options)
        expected[label] = (batch.decode(data, label), nnc_edge.decode(data), data)
    model = silero()
    for profile in (0, 1):
        data = Encoder(profile=profile).encode(model, qp=-30)
        expected["silero_p%d" % profile] = (batch.decode(data, "silero_p%d" % profile), nnc_edge.decode(data), data)
    # an update chain: parent signalling, TCA, one tensor unchanged in step 1
    enc = Encoder(parent_signalling=True, tca=True)
    streams = []
    for step in range(3):
        diff = {name: laplace(100 + 10 * step + k, shape, 0.01) for k, (name, shape) in
                enumerate((("a", (32, 24)), ("b", (16, 40)), ("c", (16,))))}
        for d in diff.values():
            d[rng(step).random(d.shape) < 0.7] = 0
        if step == 1:
            diff["b"][:] = 0
        streams.append(enc.encode(diff, qp=-44))
    decoder = nnc_edge.Decoder()
    expected["chain"] = (batch.chain(streams, "chain"), [decoder.decode(s) for s in streams], streams)
    # rate-distortion: the same tensors and qp through both encoders
    rd = {}
    for label, tensors in (("random", random_model(7)), ("silero", model)):
        for qp in RD_QPS:
            for dq in (True, False):
                job = batch.compress(tensors, "rd_%s_%d_%d" % (label, qp, dq), qp=qp, use_dq=dq)
                rd[(label, qp, dq)] = (job, tensors, nnc_edge.encode(tensors, qp=qp, dq=dq))
    batch.run()
    return expected, rd


@pytest.mark.parametrize("label", [c[0] for c in DECODE_CASES] + ["silero_p0", "silero_p1"])
def test_nncodec_decodes_our_streams_bit_exactly(reference, label):
    job, ours, data = reference[0][label]
    assert_same_as_ours(load_npz(job["out"]), ours, label)
    if label in ("p1_raw_float", "silero_p0", "silero_p1"):
        assert list(ours)[-1] in ("gain", "final_conv.bias")
        assert [u.ndu.nnr_compressed_data_unit_payload_type for u in ndus(data)][-1] == NNR_PT_RAW_FLOAT


def test_nncodec_decodes_our_update_chain(reference):
    job, ours, streams = reference[0]["chain"]
    assert "b" not in ours[1]  # the all-zero update of "b" is omitted (supplement 5.7)
    for step, (out, want) in enumerate(zip(job["outs"], ours)):
        assert_same_as_ours(load_npz(out), want, "chain step %d" % step)


def mse(tensors, decoded):
    squared = 0.0
    count = 0
    for name, array in tensors.items():
        if array.dtype.kind == "f":
            squared += float(((decoded[name].astype(np.float64) - array) ** 2).sum())
            count += array.size
    return squared / count


@pytest.mark.parametrize("label", ["random", "silero"])
@pytest.mark.parametrize("qp", RD_QPS)
@pytest.mark.parametrize("dq", [True, False])
def test_rate_distortion_at_least_as_good_as_nncodec(reference, label, qp, dq):
    job, tensors, ours = reference[1][(label, qp, dq)]
    with open(job["out"], "rb") as f:
        theirs = f.read()
    their_mse = mse(tensors, nnc_edge.decode(theirs))
    our_mse = mse(tensors, nnc_edge.decode(ours))
    assert len(ours) <= len(theirs), (len(ours), len(theirs))
    assert our_mse <= their_mse, (our_mse, their_mse)
