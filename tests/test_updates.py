"""Incremental model updates (nnc_edge.updates): identity, encoding, applying on the device, chains.

The silero-vad chain simulates fine-tuning: 5 updates that move a sparse, drifting subset of the
weights of the model decoded from the conformance vector p1_real_silero_vad.nnc.
"""

import hashlib
import io
import os
import struct
import subprocess

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from decoder_core.units import nnr_unit_size
from nnc_edge import modelio, updates
from nnc_edge.updates import (
    ChainState, CorruptUpdateError, MissingStateError, MissingUpdateError, RepeatedUpdateError, UpdateError,
    UpdateInfo, WrongBaseError, apply_update, encode_update, model_digest, read_update_info, update_topology,
)

from conftest import CONFORMANCE_DIR

SILERO = str(CONFORMANCE_DIR / "p1_real_silero_vad.nnc")
STEP = 2.0 ** -8  # the step size at qp -32, qp_density 2
REFERENCE_PYTHON = os.path.join(os.environ.get("NNC_REFERENCE_VENV", "/tmp/refvenv"), "bin", "python")


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_same_model(a, b):
    assert list(sorted(a)) == list(sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def finetune(model, step, rng, small=0.3 * STEP):
    """One simulated fine-tuning round on the device's model: a band of rows of every weight, moving one
    row per round, drifts by ``small`` (below the quantization step); 1 % of all elements, a new random
    subset each round, move by N(0, (4 steps)^2)."""
    new = {}
    for name, w in model.items():
        d = np.zeros_like(w)
        if w.ndim >= 2:
            rows = (np.arange(max(1, w.shape[0] // 8)) + step) % w.shape[0]
            d[rows] += np.float32(small)
        mask = rng.random(w.shape) < 0.01
        d[mask] += rng.normal(0.0, 4 * STEP, int(mask.sum())).astype(np.float32)
        new[name] = w + d
    return new


@pytest.fixture(scope="module")
def silero_base():
    return nnc_edge.decode(SILERO)


class Chain:
    """The host side of the silero-vad chain: update bytes and the host's view after each."""

    def __init__(self, base, steps=5, error_feedback=True, seed=5):
        self.base = base
        self.state = ChainState(model_digest(base))
        self.views = [base]
        self.updates = []
        self.ideal = [{k: v.astype(np.float64) for k, v in base.items()}]
        rng = np.random.default_rng(seed)
        options = [{}, {"sparsity": 0.5}, {"row_sparsity": 0.25}, {}, {}]
        for step in range(steps):
            device = self.views[-1]
            new = finetune(device, step, rng)
            data, view = encode_update(device, new, residual=self.state, error_feedback=error_feedback,
                                       return_model=True, **options[step])
            self.updates.append(data)
            self.views.append(view)
            self.ideal.append({k: self.ideal[-1][k] + (new[k].astype(np.float64) - device[k]) for k in base})

    def drift(self, step):
        """RMS and max of |model - ideal| after ``step`` updates, in quantization steps."""
        err = np.concatenate([(self.views[step][k] - self.ideal[step][k]).ravel() for k in self.base])
        return float(np.sqrt(np.mean(err ** 2))) / STEP, float(np.abs(err).max()) / STEP


@pytest.fixture(scope="module")
def chain(silero_base):
    return Chain(silero_base)


@pytest.fixture
def files(chain, tmp_path):
    """The base model as a file, and the chain's updates as u1.nnc ... u5.nnc, in tmp_path."""
    model = tmp_path / "model.safetensors"
    modelio.save(model, chain.base)
    paths = []
    for i, data in enumerate(chain.updates, 1):
        p = tmp_path / ("u%d.nnc" % i)
        p.write_bytes(data)
        paths.append(str(p))
    return str(model), paths


def listing(directory):
    return sorted(os.listdir(directory))


# --- the model digest -----------------------------------------------------------------------------
def test_model_digest_follows_the_documented_layout():
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "a.b": np.array([7, -1], dtype=np.int64),
               "é": np.zeros((), dtype=np.uint8)}
    h = hashlib.sha256(b"nnc-edge model sha256 v1\x00" + struct.pack("<I", 3))
    for name, dtype, shape, raw in (("a.b", b"<i8", (2,), struct.pack("<2q", 7, -1)),
                                    ("w", b"<f4", (2, 3), struct.pack("<6f", 0, 1, 2, 3, 4, 5)),
                                    ("é", b"|u1", (), b"\x00")):
        n = name.encode("utf-8")
        h.update(struct.pack("<I", len(n)) + n + struct.pack("<B", len(dtype)) + dtype)
        h.update(struct.pack("<B%dQ" % len(shape), len(shape), *shape) + struct.pack("<Q", len(raw)) + raw)
    assert model_digest(tensors) == h.digest()


def test_model_digest_sees_every_part_but_not_the_order():
    a = {"x": np.ones((2, 2), np.float32), "y": np.zeros(3, np.float32)}
    d = model_digest(a)
    assert model_digest({"y": a["y"], "x": a["x"]}) == d
    assert model_digest({"x": a["x"].astype(">f4"), "y": a["y"]}) == d  # values, not the byte order
    for other in ({"x": a["x"], "z": a["y"]},                              # a name
                  {"x": a["x"].astype(np.float64), "y": a["y"]},           # a dtype
                  {"x": a["x"].reshape(4), "y": a["y"]},                   # a shape
                  {"x": a["x"], "y": np.array([0, 0, -0.0], np.float32)},  # one bit
                  {"x": a["x"]}):                                          # a tensor
        assert model_digest(other) != d


# --- the update record ----------------------------------------------------------------------------
def test_update_info_bytes_text_and_unit():
    info = UpdateInfo(7, bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34)), continues_state=True)
    raw = info.to_bytes()
    assert len(raw) == 106 and raw[:6] == b"NNCU\x01\x01" and raw[6:10] == b"\x00\x00\x00\x07"
    assert UpdateInfo.from_bytes(raw) == info
    assert UpdateInfo.from_text(info.to_text()) == info
    unit = info.unit()
    assert nnr_unit_size(unit, 0)[0] == len(unit) == 109 and unit[2] == (updates.UPDATE_INFO_UNIT_TYPE << 2) | 2
    for bad, what in ((b"NNCX" + raw[4:], "not an nnc-edge update record"), (raw[:4] + b"\x02" + raw[5:], "version 2"),
                      (raw + b"\x00", "107 bytes"), (raw[:5] + b"\x80" + raw[6:], "unknown bits")):
        with pytest.raises(UpdateError, match=what):
            UpdateInfo.from_bytes(bad)
    with pytest.raises(UpdateError, match="not an nnc-edge update record"):
        UpdateInfo.from_text("sha256:" + "0" * 64)


def test_conforming_decoders_skip_the_record(chain):
    data = chain.updates[0]
    info = read_update_info(data)
    assert info.source == "unit" and info.sequence == 1 and info.parent == model_digest(chain.base)
    assert info.root == info.parent and info.result == model_digest(chain.views[1]) and not info.continues_state
    assert read_update_info(io.BytesIO(data)) == info
    # The record is the unit right after NNR_STR; the decoders ignore it (Table 3, unspecified type).
    str_size = nnr_unit_size(data, 0)[0]
    assert data[str_size:str_size + 109] == info.unit()
    without = data[:str_size] + data[str_size + 109:]
    topology = update_topology(chain.base)
    decoded = nnc_edge.decode(data, topology)
    assert read_update_info(without) is None
    for name, array in nnc_edge.decode(without, topology).items():
        assert np.array_equal(array, decoded[name])
    later = [read_update_info(d) for d in chain.updates]
    assert [i.sequence for i in later] == [1, 2, 3, 4, 5]
    assert all(i.continues_state for i in later[1:])  # TCA against the previous update
    assert all(later[k].parent == later[k - 1].result and later[k].root == info.root for k in range(1, 5))


# --- the conformance chains -----------------------------------------------------------------------
@pytest.mark.parametrize("name,steps", [("p1_tca", 4), ("p1_diff", 3)])
def test_conformance_chains_decode_and_apply_step_by_step(name, steps, tmp_path):
    paths = [str(CONFORMANCE_DIR / ("%s_%d.nnc" % (name, i))) for i in range(steps)]
    expected = []
    for i in range(steps):
        with np.load(str(CONFORMANCE_DIR / ("%s_%d.npz" % (name, i)))) as npz:
            expected.append({k: npz[k] for k in npz.files})
    decoder = nnc_edge.Decoder()
    for path, want in zip(paths, expected):
        got = decoder.decode(path)
        assert_same_model(got, want)
    # As updates (NNCodec writes no record: allow_anonymous), one call or one call per step with the
    # decoder state kept beside the model file; the result is the float32 sum of the differences.
    shape = expected[0]["0"].shape
    total = np.zeros(shape, np.float32)
    for want in expected:
        total = updates.add_difference(total, want["0"])
    model = tmp_path / "m.npz"
    modelio.save(model, {"0": np.zeros(shape, np.float32)})
    with pytest.raises(UpdateError, match="no nnc-edge update record"):
        apply_update(str(model), paths[0])
    assert np.array_equal(apply_update(str(model), paths, allow_anonymous=True)["0"], total)
    for path in paths:
        apply_update(str(model), path, str(model), allow_anonymous=True)
    assert np.array_equal(modelio.load(model)["0"], total)
    assert len([f for f in listing(tmp_path) if f.endswith(".nncstate")]) == 1
    if name == "p1_tca":
        # Without the state file the TCA steps cannot decode.
        modelio.save(model, {"0": np.zeros(shape, np.float32)})
        apply_update(str(model), paths[0], str(model), allow_anonymous=True)
        for stale in listing(tmp_path):
            if stale.endswith(".nncstate"):
                os.remove(tmp_path / stale)
        with pytest.raises(NNCError, match="temporal context adaptation"):
            apply_update(str(model), paths[1], str(model), allow_anonymous=True)


# --- the silero-vad chain on the device -----------------------------------------------------------
def test_device_reproduces_the_host_view_bit_exactly(chain, files, tmp_path):
    model, paths = files
    for step, path in enumerate(paths, 1):
        new = apply_update(model, path, model)
        assert_same_model(new, chain.views[step])
        assert_same_model(modelio.load(model), chain.views[step])
        states = [f for f in listing(tmp_path) if f.endswith(".nncstate")]
        assert states == [os.path.basename(updates.state_path(model, model_digest(chain.views[step])))]
        state = ChainState.load(str(tmp_path / states[0]))
        assert state.sequence == step and state.model == model_digest(chain.views[step])
    # Unchanged tensors keep their exact bits; final_conv.bias (all zero) never changes.
    assert chain.views[5]["final_conv.bias"] is chain.base["final_conv.bias"]


def test_the_whole_chain_in_one_call_and_in_memory(chain, files, tmp_path):
    model, paths = files
    out = str(tmp_path / "after.npz")
    new, state = apply_update(model, paths, out, return_state=True)
    assert_same_model(new, chain.views[5])
    assert_same_model(modelio.load(out), chain.views[5])
    assert state.sequence == 5
    # In memory: a dict and the ChainState handed from call to call.
    device, st = chain.base, None
    for data in chain.updates:
        device, st = apply_update(device, io.BytesIO(data), state=st, return_state=True, chunk_size=97)
    assert_same_model(device, chain.views[5])


def refused(model, update, error, match=None):
    """Apply must raise ``error`` and leave the model file and its folder exactly as they were."""
    folder = os.path.dirname(model)
    before = (file_sha256(model), listing(folder))
    with pytest.raises(error, match=match):
        apply_update(model, update, model)
    assert (file_sha256(model), listing(folder)) == before


def test_wrong_base_missing_and_repeated_updates_are_refused(chain, files):
    model, paths = files
    refused(model, paths[1], MissingUpdateError, "update 2 needs the model after update 1, but the model is at "
                                                  "update 0: update 1 missing")
    apply_update(model, paths[0], model)
    refused(model, paths[0], RepeatedUpdateError, "update 1 has already been applied")
    refused(model, paths[3], MissingUpdateError, "update 4 .* at update 1: updates 2..3 missing")
    refused(model, [paths[1], paths[3]], MissingUpdateError, "update 4 .* at update 2: update 3 missing")
    apply_update(model, paths[1:3], model)
    refused(model, paths[1], RepeatedUpdateError, "update 2 is older than the model, which is at update 3")
    # Another model: one weight one step off.
    other = dict(chain.views[3])
    other["conv1.bias"] = other["conv1.bias"] + np.float32(STEP)
    modelio.save(model, other)
    refused(model, paths[3], WrongBaseError, "applies to the model with digest")
    # A stand-alone update made for that model (no chain state: sequence given, root unknown) applies.
    data, view = encode_update(other, chain.views[4], sequence=4, return_model=True)
    info = read_update_info(data)
    assert info.parent == model_digest(other) and info.sequence == 4 and not info.continues_state
    assert_same_model(apply_update(model, data, model), view)
    assert_same_model(modelio.load(model), view)


def test_missing_decoder_state_is_refused_before_decoding(chain, files, tmp_path):
    model, paths = files
    apply_update(model, paths[0], model)
    for f in listing(tmp_path):
        if f.endswith(".nncstate"):
            os.remove(tmp_path / f)
    refused(model, paths[1], MissingStateError, "update 2 continues the decoder state of update 1")


def corruptions(data):
    """(label, corrupted bitstream) pairs: flipped bytes in the payloads, the record and a header, a cut."""
    str_end = nnr_unit_size(data, 0)[0]
    rec = str_end + 3  # the record's payload
    offsets = []
    pos = str_end
    while pos < len(data):
        size = nnr_unit_size(data, pos)[0]
        offsets.append((pos, size))
        pos += size
    ndus = [(p, s) for p, s in offsets if data[p + 2] >> 2 == 5 and s > 200]
    out = []
    for i, (p, s) in enumerate(ndus[:3]):
        b = bytearray(data)
        b[p + s // 2] ^= 0x10  # inside an arithmetic-coded payload
        out.append(("payload %d" % i, bytes(b)))
    for what, at in (("parent digest", rec + 10 + 32), ("result digest", rec + 10 + 64 + 5),
                     ("sequence", rec + 9), ("record magic", rec), ("ndu size", ndus[0][0] + 1)):
        b = bytearray(data)
        b[at] ^= 0x01
        out.append((what, bytes(b)))
    out.append(("truncated", data[:len(data) - 7]))
    out.append(("cut in the record", data[:rec + 20]))
    return out


def test_corrupted_updates_are_refused_and_leave_the_model_untouched(chain, files):
    model, paths = files
    apply_update(model, paths[0], model)
    data = chain.updates[1]
    for label, bad in corruptions(data):
        folder = os.path.dirname(model)
        before = (file_sha256(model), listing(folder))
        with pytest.raises(NNCError):
            apply_update(model, bad, model)
        assert (file_sha256(model), listing(folder)) == before, label
    # mps_quantization_parameter one off (the last bit of the MPS payload's 4th byte): the update
    # decodes, with another step size; only the result digest tells.
    mps = nnr_unit_size(data, 0)[0] + 109
    assert data[mps + 2] >> 2 == 1
    b = bytearray(data)
    b[mps + 3 + 3] ^= 0x01
    refused(model, bytes(b), CorruptUpdateError, "update 2 decoded to a model with digest [0-9a-f]+, but its record "
                                                 "promises")
    # A good update after a bad one in the same call: nothing is written either.
    refused(model, [paths[1], corruptions(chain.updates[2])[0][1]], NNCError)
    assert_same_model(apply_update(model, paths[1:], model), chain.views[5])


def test_error_feedback_bounds_the_drift(silero_base, chain):
    plain = Chain(silero_base, error_feedback=False)
    rms_plain = [plain.drift(step)[0] for step in range(1, 6)]
    rms_fed = [chain.drift(step)[0] for step in range(1, 6)]
    max_fed = [chain.drift(step)[1] for step in range(1, 6)]
    # Without error feedback the sub-step drift of the moving band is never sent: the error grows
    # with every round; with it the error stays at the quantization error.
    assert all(b > a for a, b in zip(rms_plain, rms_plain[1:]))
    assert rms_plain[-1] > 2.5 * rms_fed[-1]
    # What sparsification drops in steps 2 and 3 is sent with the next update: the largest error is
    # back at the quantization error (DQ: up to about 1.3 steps) after steps 4 and 5.
    assert max(rms_fed) < 0.3 and max_fed[2] > 3 and max(max_fed[3:]) < 1.5
    # The residual is kept: device model + residual is the last target (up to float32 rounding).
    last = chain.views[5]
    for name, r in chain.state.residual.items():
        target = chain.ideal[5][name]
        assert np.abs(last[name].astype(np.float64) + r - target).max() < 1e-5


# --- the host side ------------------------------------------------------------------------------------
def test_chain_state_persists_between_runs(silero_base, tmp_path):
    rng = np.random.default_rng(1)
    news = [finetune(silero_base, 0, rng)]
    in_memory = ChainState(model_digest(silero_base))
    d1, v1 = encode_update(silero_base, news[0], residual=in_memory, return_model=True)
    news.append(finetune(v1, 1, rng))
    d2, v2 = encode_update(v1, news[1], residual=in_memory, return_model=True)
    path = str(tmp_path / "chain.state")
    assert encode_update(silero_base, news[0], residual=path) == d1
    saved = ChainState.load(path)
    assert saved.sequence == 1 and saved.model == model_digest(v1) and saved.bases and saved.residual
    assert saved.parameter_ids == {name: i for i, name in enumerate(silero_base)}
    assert encode_update(v1, news[1], residual=path) == d2  # the encoder state (TCA) came back from the file
    with pytest.raises(ValueError, match="not the model the chain's last update produced"):
        encode_update(v1, news[1], residual=path)
    with pytest.raises(ValueError, match="the next one is 3, not 5"):
        encode_update(v2, news[1], residual=path, sequence=5)
    with pytest.raises(NNCError, match="not an nnc-edge chain state"):
        ChainState.load(SILERO)


def test_unchanged_tensors_are_left_out_and_inputs_checked(silero_base):
    new = dict(silero_base)
    new["conv2.bias"] = new["conv2.bias"] + np.float32(0.5)
    data, view = encode_update(silero_base, new, return_model=True)
    assert list(nnc_edge.decode(data, update_topology(silero_base))) == ["conv2.bias"]
    assert all(view[k] is silero_base[k] for k in silero_base if k != "conv2.bias")
    empty = encode_update(silero_base, silero_base, sequence=3)
    assert nnc_edge.decode(empty, update_topology(silero_base)) == {} and len(empty) < 140
    info = read_update_info(empty)
    assert info.parent == info.result and info.sequence == 3 and info.root == bytes(32)
    with pytest.raises(ValueError, match="cannot add or remove tensors"):
        encode_update(silero_base, {k: v for k, v in silero_base.items() if k != "conv1.bias"})
    with pytest.raises(ValueError, match="cannot change shapes or dtypes"):
        encode_update(silero_base, {**silero_base, "conv1.bias": silero_base["conv1.bias"].astype(np.float64)})
    ints = {"i": np.arange(4, dtype=np.int64), "w": np.ones((4, 4), np.float32)}
    with pytest.raises(ValueError, match="only float32 tensors can change"):
        encode_update(ints, {"i": ints["i"] + 1, "w": ints["w"]})
    data, view = encode_update(ints, {"i": ints["i"], "w": ints["w"] * 2}, return_model=True)
    assert view["i"] is ints["i"] and np.array_equal(apply_update(ints, data)["w"], view["w"])


def test_sparsity_and_row_sparsity(silero_base):
    rng = np.random.default_rng(2)
    d = rng.normal(0, 1, (16, 10)).astype(np.float32)
    s = updates.sparsify(d, sparsity=0.75)
    assert np.count_nonzero(s) == 40 and np.abs(d[s == 0]).max() <= np.abs(s[s != 0]).min()
    r = updates.sparsify(d, row_sparsity=0.5)
    norms = np.linalg.norm(d, axis=1)
    zero_rows = ~r.any(axis=1)
    assert zero_rows.sum() == 8 and norms[zero_rows].max() <= norms[~zero_rows].min()
    assert np.array_equal(r[~zero_rows], d[~zero_rows]) and np.array_equal(updates.sparsify(d), d)
    new = finetune(silero_base, 0, rng, small=0.0)
    sizes = {}
    # (Uniform quantization for "sparse": the DQ trellis may give a zero a nonzero level.)
    for label, kw in (("plain", {}), ("sparse", {"sparsity": 0.995, "dq": False}), ("rows", {"row_sparsity": 0.5})):
        data, view = encode_update(silero_base, new, return_model=True, **kw)
        sizes[label] = len(data)
        decoded = nnc_edge.decode(data, update_topology(silero_base))
        if label == "rows":
            w = decoded["lstm_cell.weight_hh"]
            assert (~w.any(axis=1)).sum() >= w.shape[0] // 2
        if label == "sparse":
            assert all(np.count_nonzero(v) <= v.size - int(0.995 * v.size) for v in decoded.values())
    assert sizes["sparse"] < sizes["plain"] and sizes["rows"] < sizes["plain"]


def test_nncodec_compatible_record(silero_base, tmp_path):
    rng = np.random.default_rng(3)
    state = ChainState(model_digest(silero_base))
    device = silero_base
    streams = []
    for step in range(2):
        data, device = encode_update(device, finetune(device, step, rng), residual=state, nncodec_compatible=True,
                                     return_model=True)
        streams.append(data)
        info = read_update_info(data)
        assert info.source == "base_model_id" and info.sequence == step + 1
    assert_same_model(apply_update(silero_base, streams), device)
    if not os.path.exists(REFERENCE_PYTHON):
        pytest.skip("NNCodec reference venv not found")
    paths = []
    for i, data in enumerate(streams):
        paths.append(str(tmp_path / ("c%d.nnc" % i)))
        with open(paths[-1], "wb") as f:
            f.write(data)
    ours = nnc_edge.Decoder()
    np.savez(str(tmp_path / "ours.npz"), **{"%d/%s" % (i, k): v for i, p in enumerate(paths)
                                            for k, v in ours.decode(p).items()})
    script = (
        "import sys, numpy as np\nfrom nncodec import nnc\n"
        "base = {'parameters': {}, 'put_node_depth': {}, 'device_id': 0, 'parameter_id': {}}\n"
        "ours = np.load(sys.argv[1])\nbad = []\n"
        "for i, p in enumerate(sys.argv[2:]):\n"
        "    out = nnc.decompress(bytearray(open(p, 'rb').read()), approx_param_base=base, update_base_param=True)\n"
        "    bad += [k for k, v in out.items() if not np.array_equal(v, ours['%d/%s' % (i, k)])]\n"
        "    assert len(out) == len([k for k in ours.files if k.startswith('%d/' % i)])\n"
        "print('BAD', bad)\n")
    proc = subprocess.run([REFERENCE_PYTHON, "-c", script, str(tmp_path / "ours.npz")] + paths,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BAD []" in proc.stdout
