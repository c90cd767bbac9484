"""Every conformance vector decodes bit-exactly, through nnc_edge (numpy) and decoder_core (array.array).

The vectors are NNCodec 2.1.3 bitstreams with the reference decoder's output (.npz). Chains
(p1_tca_*, p1_diff_*) decode in step order through one decoder, each step compared with its own .npz.
Set NNC_CONFORMANCE_DIR to use vectors elsewhere than ../shared/conformance/nncodec-2.1.3. Unlike
tests that skip without the vectors, this module fails to collect: CI must not pass without them.
"""

import json

import numpy as np
import pytest

import decoder_core
import nnc_edge
from conftest import CONFORMANCE_DIR


def manifest_vectors():
    with open(CONFORMANCE_DIR / "manifest.json") as f:
        return json.load(f)["vectors"]


def conformance_cases():
    """[(id, [vector names in decoding order])]: a single vector, or a whole chain in step order."""
    cases = []
    chains = {}
    for v in manifest_vectors():
        if "chain" in v:
            chains.setdefault(v["chain"], []).append(v)
        else:
            cases.append((v["name"], [v["name"]]))
    for chain, steps in chains.items():
        steps.sort(key=lambda v: v["step"])
        assert [v["step"] for v in steps] == list(range(len(steps))), "chain %s has gaps" % chain
        cases.append((chain, [v["name"] for v in steps]))
    return cases


CASES = conformance_cases()


def read_vector(name):
    with open(CONFORMANCE_DIR / (name + ".nnc"), "rb") as f:
        return f.read()


def expected_tensors(name):
    with np.load(CONFORMANCE_DIR / (name + ".npz"), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def assert_bit_exact(got, expected, where):
    """Same names in the same order, same dtype and shape, identical bits (so -0.0 != 0.0 here)."""
    assert list(got) == list(expected), where
    for key, want in expected.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, (where, key, have.dtype, have.shape)
        assert have.dtype.itemsize == 4, (where, key, have.dtype)
        assert np.array_equal(have.view(np.uint32), want.view(np.uint32)), (where, key)


def core_as_numpy(decoded):
    """decoder_core.decode's [(name, shape, array.array)] as a dict of numpy arrays, checking the types."""
    out = {}
    for name, shape, values in decoded:
        assert isinstance(shape, tuple) and values.typecode in ("f", "i"), (name, shape, values.typecode)
        dtype = np.float32 if values.typecode == "f" else np.int32
        assert len(values) == int(np.prod(shape, dtype=np.int64)), name
        out[name] = np.frombuffer(values, dtype=dtype).reshape(shape)
    return out


def test_manifest_covers_the_files():
    names = {v["name"] for v in manifest_vectors()}
    on_disk = {p.stem for p in CONFORMANCE_DIR.glob("*.nnc")}
    assert names == on_disk
    assert sum(len(steps) for _, steps in CASES) == len(names)


@pytest.mark.parametrize("steps", [steps for _, steps in CASES], ids=[case for case, _ in CASES])
def test_nnc_edge_decodes_bit_exactly(steps):
    if len(steps) == 1:
        # nnc_edge.decode takes a path as well as bytes.
        assert_bit_exact(nnc_edge.decode(str(CONFORMANCE_DIR / (steps[0] + ".nnc"))), expected_tensors(steps[0]),
                         steps[0])
        return
    decoder = nnc_edge.Decoder()
    for name in steps:
        assert_bit_exact(decoder.decode(read_vector(name)), expected_tensors(name), name)


@pytest.mark.parametrize("steps", [steps for _, steps in CASES], ids=[case for case, _ in CASES])
def test_decoder_core_decodes_bit_exactly(steps, backend):
    # Without output buffers the pure-Python backend decodes non-chain float tensors straight into
    # float32 (payload.scale_levels); the compiled one goes through int32 levels.
    if len(steps) == 1:
        assert_bit_exact(core_as_numpy(decoder_core.decode(read_vector(steps[0]))), expected_tensors(steps[0]),
                         steps[0])
        return
    decoder = decoder_core.Decoder()
    for name in steps:
        assert_bit_exact(core_as_numpy(decoder.decode(read_vector(name))), expected_tensors(name), name)


def test_tca_steps_need_the_earlier_steps():
    # Temporal context adaptation codes against the previous step's tensor: without that state a
    # later step is rejected rather than decoded wrongly, so the chain tests above exercise the state.
    steps = dict(CASES)["p1_tca"]
    for name in steps[1:]:
        with pytest.raises(decoder_core.NNCError, match="previously decoded tensor"):
            nnc_edge.decode(read_vector(name))
