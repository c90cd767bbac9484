"""Slice mode of decoder_core.StreamDecoder: payloads decoded while their bytes arrive.

Every conformance vector (chains in step order through one decoder) is fed in chunks of 1 byte,
7 bytes, 4 KiB and the whole file, with slices of at most 1, 7 and 4096 elements, on both backends:
the concatenated slices equal the reference output bit for bit. The slice contract itself (sizes,
order, typecodes, row-major starts) and the failure cases are checked here too.
"""

from array import array

import numpy as np
import pytest

import decoder_core
from decoder_core import NNCError, StreamDecoder
from decoder_core.incremental import MemoryChainState
from test_conformance import CASES, expected_tensors, read_vector

CHUNKS = [1, 7, 4096, 0]          # 0: the whole file in one feed()
SLICES = [1, 7, 4096]
# Feeding 239 KB one byte at a time through the pure-Python decoder takes minutes: the two real
# models are fed byte by byte only through the compiled backend (the framing code is shared).
SLOW = {"p0_real_silero_vad", "p1_real_silero_vad"}


def collect(dec, data, chunk, n):
    """Feed ``data`` in ``chunk``-byte pieces; returns {name: (shape, flat ndarray)} and checks the
    slice contract on the way."""
    got = {}
    step = chunk or len(data)
    for i in range(0, len(data), step):
        for name, shape, start, values in dec.feed(data[i:i + step]):
            assert isinstance(values, array) and values.typecode in ("f", "i"), name
            count = int(np.prod(shape)) if shape else 1
            entry = got.setdefault(name, [shape, [], 0])
            assert entry[0] == shape and start == entry[2], (name, start, entry[2])
            entry[1].append(np.frombuffer(values, dtype=np.float32 if values.typecode == "f" else np.int32))
            entry[2] = start + len(values)
            assert entry[2] <= count
    dec.close()
    out = {}
    for name, (shape, parts, end) in got.items():
        flat = np.concatenate(parts)
        assert end == flat.size == (int(np.prod(shape)) if shape else 1), name
        out[name] = (shape, flat)
    return out


def assert_same(got, expected, where):
    assert list(got) == list(expected), where
    for key, want in expected.items():
        shape, flat = got[key]
        assert tuple(shape) == want.shape and flat.dtype == want.dtype, (where, key)
        assert np.array_equal(flat.view(np.uint32), want.reshape(-1).view(np.uint32)), (where, key)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: "chunk%d" % c if c else "whole")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_slices_equal_reference(case, chunk, backend):
    case_id, steps = case
    if chunk == 1 and backend == "python" and case_id in SLOW:
        pytest.skip("byte-by-byte pure-Python run of a real model: covered by the compiled backend")
    for n in SLICES:
        dec = StreamDecoder(slice_elements=n)
        for name in steps:
            got = collect(dec, read_vector(name), chunk, n)
            assert_same(got, expected_tensors(name), (name, chunk, n))


def slices_of(data, n, chunk=None, **kw):
    dec = StreamDecoder(slice_elements=n, **kw)
    out = []
    step = chunk or len(data)
    for i in range(0, len(data), step):
        out.extend(dec.feed(data[i:i + step]))
    dec.close()
    return out


def test_slices_are_row_major_and_at_most_n(backend):
    data = read_vector("p1_large_2d")
    for n in (1, 5, 1000):
        out = slices_of(data, n, chunk=333)
        starts = {}
        for name, shape, start, values in out:
            assert 0 < len(values) <= n
            assert start == starts.get(name, 0)
            starts[name] = start + len(values)


def test_block_scan_slices_hold_whole_block_rows(backend):
    # scan_order 2: blocks of 16 rows; a slice is one or more whole block rows whatever N is.
    data = read_vector("p1_entrypoints_scan2")
    ref = expected_tensors("p1_entrypoints_scan2")
    for name, shape, start, values in slices_of(data, 7, chunk=100):
        width = int(np.prod(shape[1:]))
        assert start % (16 * width) == 0
        assert len(values) % (16 * width) == 0 or start + len(values) == int(np.prod(shape))
    assert set(ref)


def test_without_slice_elements_feed_is_unchanged():
    data = read_vector("p0_uniform_2d") if "p0_uniform_2d" in [c[0] for c in CASES] else read_vector(CASES[0][0])
    out = StreamDecoder().feed(data)
    assert all(len(t) == 3 for t in out)


def test_iter_feed_gives_the_same_slices(backend):
    data = read_vector("p1_real_silero_vad")
    ref = expected_tensors("p1_real_silero_vad")
    dec = StreamDecoder(slice_elements=2048)
    got = {}
    for i in range(0, len(data), 256):
        for name, shape, start, values in dec.iter_feed(data[i:i + 256]):
            got.setdefault(name, []).append(np.frombuffer(values, dtype=np.float32))
    dec.close()
    assert list(got) == list(ref)
    for key in ref:
        assert np.array_equal(np.concatenate(got[key]).view(np.uint32), ref[key].reshape(-1).view(np.uint32))


def test_slice_elements_must_be_positive():
    with pytest.raises(ValueError):
        StreamDecoder(slice_elements=0)


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.999])
def test_truncated_stream_raises_at_close(backend, cut):
    data = read_vector("p1_real_silero_vad")
    dec = StreamDecoder(slice_elements=4096)
    dec.feed(data[:int(len(data) * cut)])
    with pytest.raises(NNCError) as info:
        dec.close()
    assert "stream ends inside" in str(info.value)


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_a_stream_given_up_inside_a_tensor_leaves_nothing_for_the_next(backend, cut):
    # The decoder keeps its position and preamble loops from tensor to tensor; one stopped inside a
    # tensor (the stream ended there, or the caller reset) must not go on with the next stream's.
    data = read_vector("p1_real_silero_vad")
    dec = StreamDecoder(slice_elements=4096)
    dec.feed(data[:int(len(data) * cut)])
    with pytest.raises(NNCError):
        dec.close()
    assert_same(collect(dec, data, 4096, 4096), expected_tensors("p1_real_silero_vad"), cut)
    dec.feed(data[:int(len(data) * cut)])
    dec.reset()
    assert_same(collect(dec, data, 4096, 4096), expected_tensors("p1_real_silero_vad"), cut)


def test_corrupt_payload_raises_nncerror(backend):
    data = bytearray(read_vector("p1_large_2d"))
    # The last payload byte carries the stop bit: clearing the final bytes breaks terminate_cabac().
    data[-1] = 0
    data[-2] ^= 0xFF
    dec = StreamDecoder(slice_elements=64)
    with pytest.raises(NNCError):
        for i in range(0, len(data), 50):
            dec.feed(bytes(data[i:i + 50]))
        dec.close()


def test_chain_state_is_read_and_written_per_slice(backend):
    # The TCA chain through an explicit MemoryChainState gives the same tensors as the default.
    names = [c for c in CASES if c[0].startswith("p1_tca")][0][1]
    chain = MemoryChainState()
    dec = StreamDecoder(slice_elements=100, chain=chain)
    for name in names:
        got = collect(dec, read_vector(name), 64, 100)
        assert_same(got, expected_tensors(name), name)
    assert set(chain.bases) == set(chain.history) and chain.bases


def test_tca_without_its_base_is_refused(backend):
    names = [c for c in CASES if c[0].startswith("p1_tca")][0][1]
    dec = StreamDecoder(slice_elements=100)
    with pytest.raises(NNCError) as info:
        dec.feed(read_vector(names[1]))
    assert "needs its previously decoded tensor" in str(info.value)
    assert decoder_core.NNCError is NNCError


def test_iter_feed_reuse_overwrites_one_array_per_typecode(backend):
    data = read_vector("p1_real_silero_vad")
    ref = expected_tensors("p1_real_silero_vad")
    dec = StreamDecoder(slice_elements=2048)
    got = {}
    arrays = set()
    for i in range(0, len(data), 256):
        for name, shape, start, values in dec.iter_feed(data[i:i + 256], reuse=True):
            if len(values) == 2048:
                arrays.add(id(values))
            got.setdefault(name, []).append(np.frombuffer(values, dtype=np.float32).copy())
    dec.close()
    assert len(arrays) == 1  # every full-size slice came in the same array
    for key in ref:
        assert np.array_equal(np.concatenate(got[key]).view(np.uint32), ref[key].reshape(-1).view(np.uint32))


def _in_aggregate(data, first, last):
    """``data`` with its units first..last-1 moved into one NNR_AGG unit."""
    from decoder_core.decoder import unit_spans
    from nnc_edge.encoder import unitwriter
    spans = list(unit_spans(data))
    agg = unitwriter.aggregate_unit([data[s:e] for s, e in spans[first:last]])
    return data[:spans[first][0]] + agg + data[spans[last - 1][1]:]


def test_aggregate_units_come_out_in_slices(backend):
    stream = _in_aggregate(read_vector("p1_model_dict"), 3, 5)
    got = collect(StreamDecoder(slice_elements=7), stream, 100, 7)
    assert_same(got, expected_tensors("p1_model_dict"), "agg")


def test_aggregate_units_of_a_chain_use_the_chain_state(backend):
    # The NDUs of every step inside an NNR_AGG: their TCA bases and history still go through the
    # chain object (a file-backed one on a device), not the decoder's own dicts.
    names = [c for c in CASES if c[0].startswith("p1_tca")][0][1]
    chain = MemoryChainState()
    dec = StreamDecoder(slice_elements=50, chain=chain)
    for name in names:
        data = read_vector(name)
        from decoder_core.decoder import unit_spans
        units = len(list(unit_spans(data)))
        got = collect(dec, _in_aggregate(data, units - 2, units), 64, 50)
        assert_same(got, expected_tensors(name), name)
    assert chain.bases and not dec.decoder.bases
