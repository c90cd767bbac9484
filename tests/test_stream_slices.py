"""Slice mode of nnc_edge's streaming API: nnc_edge.StreamDecoder(slice_elements=N), iter_decode and
decode_stream yield (name, shape, start, array) slices, ``array`` a 1-D numpy view of the elements
start .. start + len - 1 of the row-major tensor. Checked against the reference output of every
conformance vector and against nnc_edge.decode on streams that use the layouts which come whole
(block payloads, aggregate units) or spread over several units (partial data).

decoder_core's own slice mode (both backends, all chunkings) is tested in test_slices.py.
"""

import asyncio
import io

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from decoder_core.tables import NNR_NDU

from test_conformance import CASES, assert_bit_exact, expected_tensors, read_vector


def assemble(items):
    """{name: array} from slices, checking the contract on the way: 1-D views, in order, no gaps."""
    out = {}
    filled = {}
    for name, shape, start, array in items:
        assert isinstance(shape, tuple) and array.ndim == 1 and not array.flags.owndata, name
        assert array.dtype in (np.float32, np.int32), (name, array.dtype)
        if start == 0:
            assert name not in out, name  # each tensor once, its first slice at 0
            out[name] = np.empty(shape, dtype=array.dtype)
            filled[name] = 0
        flat = out[name].reshape(-1)
        assert start == filled[name] and flat.dtype == array.dtype, (name, start, filled[name])
        flat[start:start + array.size] = array
        filled[name] = start + array.size
    for name in out:
        assert filled[name] == out[name].size, name
    return out


def feed_all(dec, data, chunk):
    items = []
    for i in range(0, len(data), chunk):
        items.extend(dec.feed(data[i:i + chunk]))
    dec.close()
    return items


@pytest.mark.parametrize("chunk, n", [(7, 4096), (4096, 7), (1 << 20, 1000)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_slices_equal_the_reference(case, chunk, n):
    _, steps = case
    dec = nnc_edge.StreamDecoder(slice_elements=n)  # one decoder through the steps of a chain
    for name in steps:
        items = feed_all(dec, read_vector(name), chunk)
        if "scan" not in name:  # a block scan's slices are whole block rows
            assert max(array.size for _, _, _, array in items) <= n
        assert_bit_exact(assemble(items), expected_tensors(name), (name, chunk, n))


def _model():
    rng = np.random.default_rng(15)
    return {"fc.weight": (rng.laplace(size=(40, 30)) * 0.05).astype(np.float32),
            "fc.bias": (rng.standard_normal(40) * 0.01).astype(np.float32),
            "steps": np.arange(10), "one": np.float32([3.5])}


@pytest.mark.parametrize("options", [{"block": True}, {"aggregate": True, "max_unit_bytes": 400},
                                     {"max_unit_bytes": 100}, {"scan_order": 2}, {"codebook": 1}],
                         ids=["block", "aggregate", "partial-data", "scan2", "codebook"])
def test_layouts_that_come_whole_or_in_parts(options, backend):
    data = nnc_edge.encode(_model(), **options)
    want = nnc_edge.decode(data)
    got = assemble(feed_all(nnc_edge.StreamDecoder(slice_elements=7), data, 13))
    if options.get("block"):
        # A block decodes its bias before its weight (7.3.5) but lists the weight first: the slices
        # follow the list, as the whole-unit decoder does.
        assert list(got) == ["fc.weight", "fc.bias", "steps", "one"]
    assert_bit_exact(got, want, options)
    # Without a block scan or an aggregate unit, no slice exceeds the limit.
    if not options.get("scan_order") and not options.get("aggregate"):
        assert max(array.size for _, _, _, array in feed_all(nnc_edge.StreamDecoder(slice_elements=7), data, 13)) <= 7


def test_iter_feed_hands_out_the_same_slices_one_at_a_time():
    data = read_vector("p1_real_silero_vad")
    dec = nnc_edge.StreamDecoder(slice_elements=2048)
    items = []
    for i in range(0, len(data), 256):
        items.extend(dec.iter_feed(data[i:i + 256]))
    dec.close()
    assert_bit_exact(assemble(items), expected_tensors("p1_real_silero_vad"), "iter_feed")
    with pytest.raises(ValueError):
        next(nnc_edge.StreamDecoder().iter_feed(data))  # only in slice mode


def test_threads_are_not_used_in_slice_mode():
    # A block scan, whose block rows the whole-unit path decodes on threads.
    dec = nnc_edge.StreamDecoder(threads=2, slice_elements=100)
    items = feed_all(dec, read_vector("p1_entrypoints_scan2"), 500)
    assert dec._pool is None
    assert_bit_exact(assemble(items), expected_tensors("p1_entrypoints_scan2"), "threads")


def test_iter_decode_slices_and_progress(tmp_path):
    data = read_vector("p1_real_silero_vad")
    want = expected_tensors("p1_real_silero_vad")
    seen = []
    path = tmp_path / "silero.nnc"
    path.write_bytes(data)
    items = list(nnc_edge.iter_decode(path, 1000, slice_elements=4096, progress=lambda *p: seen.append(p)))
    assert_bit_exact(assemble(items), want, "path")
    assert len(seen) == (len(data) + 999) // 1000 and seen[-1][0] == len(data) and seen[-1][2] == len(want)
    assert_bit_exact(assemble(nnc_edge.iter_decode(io.BytesIO(data), 7, slice_elements=100)), want, "file")


def test_decode_stream_slices():
    data = read_vector("p1_model_dict")

    async def chunks():
        for i in range(0, len(data), 50):
            await asyncio.sleep(0)
            yield data[i:i + 50]

    async def collect(offload):
        return [item async for item in nnc_edge.decode_stream(chunks(), offload=offload, slice_elements=64)]

    for offload in (True, False):
        assert_bit_exact(assemble(asyncio.run(collect(offload))), expected_tensors("p1_model_dict"), offload)


def test_decode_stream_slices_over_a_chain_with_one_decoder():
    steps = [name for case, names in CASES if case == "p1_tca" for name in names]
    dec = nnc_edge.StreamDecoder(slice_elements=500)

    async def one(data):
        async def source():
            yield data
        return [item async for item in nnc_edge.decode_stream(source(), decoder=dec)]

    for name in steps:
        assert_bit_exact(assemble(asyncio.run(one(read_vector(name)))), expected_tensors(name), name)


def test_slice_elements_must_agree_with_the_decoder():
    data = read_vector("p1_model_dict")
    with pytest.raises(ValueError) as info:
        list(nnc_edge.iter_decode(io.BytesIO(data), decoder=nnc_edge.StreamDecoder(), slice_elements=10))
    assert "slice_elements=10" in str(info.value)
    with pytest.raises(ValueError):
        nnc_edge.StreamDecoder(slice_elements=0)


def test_truncated_and_corrupt_streams_raise_nncerror_after_their_slices():
    from test_stream import unit_spans
    data = read_vector("p1_real_silero_vad")
    start, end, _ = max(unit_spans(data), key=lambda span: span[1] - span[0])
    items = []
    with pytest.raises(NNCError) as info:
        for item in nnc_edge.iter_decode(io.BytesIO(data[:(start + end) // 2]), 4096, slice_elements=512):
            items.append(item)
    assert info.value.element == "nnr_unit"
    # Slices of the largest tensor, cut in the middle of its unit, came out before the error.
    name, shape, _, _ = items[-1]
    assert 0 < sum(a.size for n, _, _, a in items if n == name) < int(np.prod(shape))

    bad = bytearray(read_vector("p1_large_2d"))
    bad[-1] = 0  # the stop bit of terminate_cabac() is in the last payload byte
    bad[-2] ^= 0xFF
    items = []
    with pytest.raises(NNCError):
        for item in nnc_edge.iter_decode(io.BytesIO(bytes(bad)), 100, slice_elements=64):
            items.append(item)
    assert items  # refused only when the unit's last byte arrived


def _partial_data_stream():
    """p1_model_dict with the NDU of its third tensor split into partial-data units (6.4.3.1)."""
    from test_stream import _split_ndu, unit_spans
    data = read_vector("p1_model_dict")
    start, end, kind = unit_spans(data)[5]
    assert kind == NNR_NDU
    parts = _split_ndu(data, start, end, 600)
    return data[:start] + b"".join(parts[:-1]), len(parts)


def test_stream_ending_between_partial_data_units_raises_nncerror():
    stream, parts = _partial_data_stream()
    assert parts >= 3
    dec = nnc_edge.StreamDecoder(slice_elements=64)
    dec.feed(stream)
    assert not dec.at_boundary
    with pytest.raises(NNCError) as info:
        dec.close()
    assert info.value.element == "partial_data_counter"


@pytest.mark.parametrize("slice_elements", [None, 64])
def test_an_empty_stream_is_an_error(slice_elements):
    with pytest.raises(NNCError) as info:
        list(nnc_edge.iter_decode(io.BytesIO(b""), slice_elements=slice_elements))
    assert "empty" in str(info.value)

    async def drain():
        reader = asyncio.StreamReader()
        reader.feed_eof()
        return [item async for item in nnc_edge.decode_stream(reader, slice_elements=slice_elements)]
    with pytest.raises(NNCError):
        asyncio.run(drain())
