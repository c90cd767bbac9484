"""Streaming decoding: decoder_core.stream.StreamDecoder (push framer), nnc_edge.decode_stream /
iter_decode / StreamDecoder, against the whole-buffer decoder on every conformance vector."""

import asyncio
import io
import os
import random

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from decoder_core.stream import StreamDecoder as CoreStreamDecoder
from decoder_core.tables import NNR_NDU
from decoder_core.units import ParserState, parse_unit
from nnc_edge.decoding import to_numpy
from nnc_edge.encoder import unitwriter

from conftest import CONFORMANCE_DIR, conformance_manifest

CONFORMANCE = str(CONFORMANCE_DIR)


def _cases():
    """Single vectors by name, and each update chain as one case: its steps in order."""
    cases = {}
    for v in conformance_manifest():
        key = v.get("chain", v["name"])
        cases.setdefault(key, []).append((v.get("step", 0), v["name"]))
    return {key: [name for _, name in sorted(steps)] for key, steps in cases.items()}


CASES = _cases()
if not CASES:
    pytest.skip("conformance vectors not found in %s (set NNC_CONFORMANCE_DIR)" % CONFORMANCE,
                allow_module_level=True)


def _read(name):
    with open(os.path.join(CONFORMANCE, name + ".nnc"), "rb") as f:
        return f.read()


_EXPECTED = {}


def expected(case):
    """nnc_edge.Decoder's output for each step of a case: a list of [(name, array)] per step."""
    if case not in _EXPECTED:
        dec = nnc_edge.Decoder()
        _EXPECTED[case] = [list(dec.decode(_read(step)).items()) for step in CASES[case]]
    return _EXPECTED[case]


def _chunks(data, how, rng):
    if how == "whole":
        return [data]
    if how == "random":
        out, pos = [], 0
        while pos < len(data):
            n = rng.choice((1, 2, 3, rng.randint(1, 64), rng.randint(1, 4096)))
            out.append(data[pos:pos + n])
            pos += n
        return out
    return [data[i:i + how] for i in range(0, len(data), how)]


def _as_numpy(items):
    return [(name, to_numpy(shape, values)) for name, shape, values in items]


def assert_same(got, want):
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), name


def unit_spans(data):
    """(start, end, nnr_unit_type) of the top-level units of a bitstream."""
    state = ParserState()
    out, offset = [], 0
    while offset < len(data):
        unit = parse_unit(data, offset, len(data), state)
        out.append((offset, offset + unit.nnr_unit_size, unit.nnr_unit_type))
        offset += unit.nnr_unit_size
    return out


# --- every conformance vector, every chunking --------------------------------------------------------
@pytest.mark.parametrize("how", [1, 7, "random", "whole"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chunkings_match_whole_decode(case, how):
    rng = random.Random("%s/%s" % (case, how))
    dec = CoreStreamDecoder()  # one decoder across the steps of a chain: close() keeps its state
    total = 0
    for step, want in zip(CASES[case], expected(case)):
        data = _read(step)
        got = []
        for chunk in _chunks(data, how, rng):
            got.extend(dec.feed(chunk))
        dec.close()
        assert_same(_as_numpy(got), want)
        total += len(data)
    assert dec.bytes == total
    assert dec.tensors == sum(len(w) for w in expected(case))


@pytest.mark.parametrize("case", sorted(k for k, v in CASES.items() if len(v) > 1))
def test_chain_fed_back_to_back(case):
    # Consecutive bitstreams of a chain need no close() in between: each NNR_STR starts the next.
    data = b"".join(_read(step) for step in CASES[case])
    dec = CoreStreamDecoder()
    got = []
    for chunk in _chunks(data, 13, None):
        got.extend(dec.feed(chunk))
    dec.close()
    assert_same(_as_numpy(got), [t for step in expected(case) for t in step])


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_tensor_is_emitted_with_the_last_byte_of_its_unit(case):
    dec = CoreStreamDecoder()
    for step, want in zip(CASES[case], expected(case)):
        data = _read(step)
        emitted = []
        pos = 0
        ndus = [(s, e) for s, e, t in unit_spans(data) if t == NNR_NDU]
        assert len(ndus) == len(want)  # the vectors have one tensor per NDU
        for k, (start, end) in enumerate(ndus):
            emitted.extend(dec.feed(data[pos:end - 1]))
            assert len(emitted) == k  # tensor k not yet: one byte of its unit is missing
            emitted.extend(dec.feed(data[end - 1:end]))
            assert len(emitted) == k + 1 and emitted[k][0] == want[k][0]  # and k + 1 not before its unit
            pos = end
        emitted.extend(dec.feed(data[pos:]))
        dec.close()
        assert_same(_as_numpy(emitted), want)


# --- framing details -----------------------------------------------------------------------------------
def test_counters_and_buffer_types():
    data = _read("p1_model_dict")
    spans = unit_spans(data)
    dec = CoreStreamDecoder()
    assert dec.feed(b"") == [] and dec.at_boundary
    got = dec.feed(bytearray(data[:100])) + dec.feed(memoryview(data)[100:])
    dec.close()
    assert (dec.bytes, dec.units, dec.tensors) == (len(data), len(spans), 5)
    assert_same(_as_numpy(got), expected("p1_model_dict")[0])


def test_pending_and_boundary_state():
    data = _read("p1_model_dict")
    start, end, _ = unit_spans(data)[3]
    dec = CoreStreamDecoder()
    dec.feed(data[:start])
    assert dec.at_boundary and dec.pending == 0
    dec.feed(data[start:start + 1])
    assert not dec.at_boundary and dec.pending == 1  # the second byte of nnr_unit_size()
    dec.feed(data[start + 1:start + 5])
    assert dec.pending == end - start - 5


def _assert_truncated(data, cut, want_tensors, offset, element):
    dec = CoreStreamDecoder()
    got = dec.feed(data[:cut])
    with pytest.raises(NNCError) as info:
        dec.close()
    assert [name for name, _, _ in got] == want_tensors
    assert info.value.offset == offset and info.value.element == element
    return dec


def test_stream_ending_mid_unit_raises_at_close_and_emits_nothing_for_it():
    data = _read("p1_model_dict")
    names = [name for name, _ in expected("p1_model_dict")[0]]
    spans = unit_spans(data)
    for k, (start, end, _) in enumerate(spans[3:]):
        _assert_truncated(data, end - 1, names[:k], start, "nnr_unit")   # last byte missing
        _assert_truncated(data, start + 3, names[:k], start, "nnr_unit")  # header only
        _assert_truncated(data, start + 1, names[:k], start, "nnr_unit_size")  # inside nnr_unit_size()


def test_close_resets_so_the_decoder_can_be_reused():
    data = _read("p1_model_dict")
    dec = _assert_truncated(data, len(data) - 10, [n for n, _ in expected("p1_model_dict")[0]][:4],
                            unit_spans(data)[-1][0], "nnr_unit")
    got = []
    for chunk in _chunks(data, 100, None):
        got.extend(dec.feed(chunk))
    dec.close()
    assert_same(_as_numpy(got), expected("p1_model_dict")[0])


def _split_ndu(data, start, end, max_payload_bytes):
    """Re-code the NDU at data[start:end] as partial-data units (6.4.3.1) with unitwriter."""
    unit = parse_unit(data, start, end, _state_before(data, start))
    size_bytes = 4 if data[start] & 0x80 else 2
    assert unit.partial_data_counter == 0
    header = data[start + size_bytes + 1:unit.payload_start]
    payload = data[unit.payload_start:unit.payload_end]
    return unitwriter.split_units(NNR_NDU, header, payload, max_payload_bytes)


def _state_before(data, start):
    """The parser state after the units before ``start`` (STR, MPS, ... activate what the NDU needs)."""
    state = ParserState()
    offset = 0
    while offset < start:
        offset += parse_unit(data, offset, len(data), state).nnr_unit_size
    return state


def _partial_stream():
    """p1_model_dict with its third tensor's NDU split into partial units of at most 600 payload bytes."""
    data = _read("p1_model_dict")
    spans = unit_spans(data)
    start, end, _ = spans[5]
    parts = _split_ndu(data, start, end, 600)
    assert len(parts) >= 3
    return data[:start] + b"".join(parts) + data[end:], start, [len(p) for p in parts]


def test_partial_data_units_join_and_emit_with_the_last_part():
    stream, start, sizes = _partial_stream()
    want = expected("p1_model_dict")[0]
    for how in (1, 7, "whole"):
        dec = CoreStreamDecoder()
        got = []
        for chunk in _chunks(stream, how, None):
            got.extend(dec.feed(chunk))
        dec.close()
        assert_same(_as_numpy(got), want)
    # Emission: nothing for the split tensor until the last byte of its last partial unit.
    dec = CoreStreamDecoder()
    got = dec.feed(stream[:start])
    assert len(got) == 2
    last_end = start + sum(sizes)
    got += dec.feed(stream[start:last_end - 1])
    assert len(got) == 2 and not dec.at_boundary
    got += dec.feed(stream[last_end - 1:last_end])
    assert [n for n, _, _ in got] == [n for n, _ in want[:3]] and dec.at_boundary


def test_stream_ending_mid_partial_data_sequence_raises_at_close():
    stream, start, sizes = _partial_stream()
    want = [n for n, _ in expected("p1_model_dict")[0]]
    for k in range(1, len(sizes)):
        cut = start + sum(sizes[:k])  # a unit boundary, but the counter has not reached 1
        dec = CoreStreamDecoder()
        got = dec.feed(stream[:cut])
        assert dec.at_unit_boundary and not dec.at_boundary
        with pytest.raises(NNCError) as info:
            dec.close()
        assert info.value.element == "partial_data_counter"
        assert [n for n, _, _ in got] == want[:2]
        # The stream goes on with the next tensor instead: also an error, at that unit.
        dec = CoreStreamDecoder()
        dec.feed(stream[:cut])
        with pytest.raises(NNCError) as info:
            dec.feed(stream[start + sum(sizes):])
        assert info.value.element == "partial_data_counter"
        assert info.value.offset == cut


def test_aggregate_unit_emits_its_tensors_when_it_is_complete():
    data = _read("p1_model_dict")
    spans = unit_spans(data)
    (s1, _, _), (_, e2, _) = spans[3], spans[4]
    agg = unitwriter.aggregate_unit([data[s:e] for s, e, _ in spans[3:5]])
    stream = data[:s1] + agg + data[e2:]
    want = expected("p1_model_dict")[0]
    dec = CoreStreamDecoder()
    got = dec.feed(stream[:s1 + len(agg) - 1])
    assert got == []
    got += dec.feed(stream[s1 + len(agg) - 1:s1 + len(agg)])
    assert [n for n, _, _ in got] == [n for n, _ in want[:2]]
    got += dec.feed(stream[s1 + len(agg):])
    dec.close()
    assert_same(_as_numpy(got), want)


def test_unit_size_limit_is_checked_before_allocating():
    data = _read("p1_model_dict")
    start, end, _ = unit_spans(data)[5]  # 4774 bytes
    dec = CoreStreamDecoder(max_unit_size=4000)
    dec.feed(data[:start + 1])
    with pytest.raises(NNCError) as info:
        dec.feed(data[start + 1:start + 2])  # nnr_unit_size() complete: refused before the body arrives
    assert "max_unit_size" in str(info.value) and "4000" in str(info.value)
    assert info.value.offset == start and info.value.element == "nnr_unit_size"
    with pytest.raises(NNCError):
        CoreStreamDecoder(max_unit_size=4000).feed(data)  # the same when the unit is inside one chunk
    hostile = b"\xff\xff\xff\xff"  # nnr_unit_size 2^31 - 1
    with pytest.raises(NNCError) as info:
        CoreStreamDecoder().feed(hostile)
    assert "max_unit_size" in str(info.value)


def test_unit_smaller_than_its_size_field_is_refused():
    for junk in (b"\x00\x01", b"\x80\x00\x00\x03"):
        for how in (1, "whole"):
            dec = CoreStreamDecoder()
            with pytest.raises(NNCError) as info:
                for chunk in _chunks(junk, how, None):
                    dec.feed(chunk)
            assert info.value.element == "nnr_unit_size" and info.value.offset == 0


def test_errors_name_stream_offsets_whatever_the_chunking():
    data = bytearray(_read("p1_model_dict"))
    start, end, _ = unit_spans(bytes(data))[5]
    data[end - 30] ^= 0xFF  # corrupt the arithmetic-coded payload near the end of the unit
    data = bytes(data)
    with pytest.raises(NNCError) as whole:
        nnc_edge.decode(data)
    assert whole.value.offset is not None and start < whole.value.offset <= end
    for how in (1, 7, 500):
        dec = CoreStreamDecoder()
        with pytest.raises(NNCError) as info:
            for chunk in _chunks(data, how, None):
                dec.feed(chunk)
        assert info.value.offset == whole.value.offset
        assert str(info.value) == str(whole.value)
        assert dec.at_unit_boundary  # the failed unit is dropped


# --- nnc_edge: numpy face, sync and async -------------------------------------------------------------
def test_nnc_edge_stream_decoder_feeds_numpy(backend):
    data = _read("p1_model_dict")
    dec = nnc_edge.StreamDecoder()
    got = []
    for chunk in _chunks(data, 700, None):
        got.extend(dec.feed(chunk))
    dec.close()
    assert_same(got, expected("p1_model_dict")[0])
    assert dec.progress() == (len(data), len(unit_spans(data)), len(got))


def test_iter_decode_path_and_file_object(tmp_path):
    data = _read("p1_real_silero_vad")
    want = expected("p1_real_silero_vad")[0]
    seen = []
    got = list(nnc_edge.iter_decode(os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc"), 1000,
                                    progress=lambda *p: seen.append(p)))
    assert_same(got, want)
    assert seen[-1] == (len(data), len(unit_spans(data)), len(want))
    assert all(a <= b for a, b in zip(seen, seen[1:])) and len(seen) == (len(data) + 999) // 1000
    assert_same(list(nnc_edge.iter_decode(io.BytesIO(data), 7)), want)
    with pytest.raises(NNCError):
        list(nnc_edge.iter_decode(str(tmp_path / "missing.nnc")))


def test_iter_decode_yields_complete_tensors_before_the_truncation_error():
    data = _read("p1_model_dict")
    got = []
    with pytest.raises(NNCError):
        for item in nnc_edge.iter_decode(io.BytesIO(data[:-3]), 64):
            got.append(item)
    assert_same(got, expected("p1_model_dict")[0][:4])


async def _collect(aiter):
    return [item async for item in aiter]


def test_decode_stream_over_asyncio_stream_reader():
    data = _read("p1_real_silero_vad")

    async def main():
        reader = asyncio.StreamReader()

        async def produce():
            for chunk in _chunks(data, 3000, None):
                reader.feed_data(chunk)
                await asyncio.sleep(0)
            reader.feed_eof()

        seen = []
        task = asyncio.ensure_future(produce())
        got = await _collect(nnc_edge.decode_stream(reader, progress=lambda *p: seen.append(p)))
        await task
        return got, seen

    got, seen = asyncio.run(main())
    assert_same(got, expected("p1_real_silero_vad")[0])
    assert seen[-1] == (len(data), len(unit_spans(data)), len(got))


def test_decode_stream_over_async_iterator_and_async_read():
    data = _read("p1_model_dict")
    want = expected("p1_model_dict")[0]

    async def chunks():
        for chunk in _chunks(data, 5, None):
            await asyncio.sleep(0)
            yield chunk

    class Reader:
        def __init__(self):
            self.f = io.BytesIO(data)

        async def read(self, n):
            return self.f.read(min(n, 11))

    for offload in (True, False):
        assert_same(asyncio.run(_collect(nnc_edge.decode_stream(chunks(), offload=offload))), want)
        assert_same(asyncio.run(_collect(nnc_edge.decode_stream(Reader(), offload=offload))), want)


def test_decode_stream_chain_with_one_decoder():
    steps = CASES["p1_tca"]
    dec = nnc_edge.StreamDecoder()

    async def main():
        out = []
        for step in steps:
            out.append(await _collect(nnc_edge.decode_stream(_aiter(_chunks(_read(step), 50, None)), decoder=dec)))
        return out

    for got, want in zip(asyncio.run(main()), expected("p1_tca")):
        assert_same(got, want)


async def _aiter(items):
    for item in items:
        yield item


def test_decode_stream_truncated_and_bad_sources():
    data = _read("p1_model_dict")

    async def main():
        got = []
        with pytest.raises(NNCError) as info:
            async for item in nnc_edge.decode_stream(_aiter(_chunks(data[:-1], 64, None))):
                got.append(item)
        return got, info.value

    got, exc = asyncio.run(main())
    assert_same(got, expected("p1_model_dict")[0][:4])
    assert exc.element == "nnr_unit"
    with pytest.raises(TypeError):
        asyncio.run(_collect(nnc_edge.decode_stream(io.BytesIO(data))))  # blocking read: use iter_decode
    with pytest.raises(TypeError):
        asyncio.run(_collect(nnc_edge.decode_stream([data])))


@pytest.mark.parametrize("threads", [1, 2])
def test_block_rows_decode_on_threads_with_identical_results(threads, backend):
    for case in ("p1_entrypoints_scan1", "p1_entrypoints_scan2", "p0_entrypoints_scan3", "p1_model_dict"):
        dec = nnc_edge.StreamDecoder(threads=threads)
        got = list(nnc_edge.iter_decode(io.BytesIO(_read(case)), 1000, decoder=dec))
        assert_same(got, expected(case)[0])
        assert dec._pool is None  # close() stopped the threads
    with pytest.raises(ValueError):
        nnc_edge.StreamDecoder(threads=0)
