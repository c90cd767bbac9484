"""transports.file.FileSource: chunked async reads, and follow mode on a file still being written."""

import asyncio
import os
import threading
import time

import pytest

import nnc_edge
from decoder_core import NNCError
from transports.file import FileSource

from test_stream import CONFORMANCE, _read, assert_same, expected, unit_spans

SILERO = os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc")


async def _collect(aiter):
    return [item async for item in aiter]


def test_chunks_are_the_file():
    data = _read("p1_real_silero_vad")
    chunks = asyncio.run(_collect(FileSource(SILERO, 10000)))
    assert b"".join(chunks) == data
    assert all(len(c) <= 10000 for c in chunks) and len(chunks) == (len(data) + 9999) // 10000


def test_decode_stream_from_file_source():
    src = FileSource(SILERO, 3333)
    got = asyncio.run(_collect(nnc_edge.decode_stream(src)))
    assert_same(got, expected("p1_real_silero_vad")[0])
    assert src.bytes_read == os.path.getsize(SILERO)


def test_missing_file_without_follow(tmp_path):
    with pytest.raises(FileNotFoundError):
        asyncio.run(_collect(FileSource(tmp_path / "missing.nnc")))
    with pytest.raises(ValueError):
        FileSource(SILERO, 0)


class SlowWriter(threading.Thread):
    """Appends ``pieces`` to ``path`` one by one; before each piece it waits for ``gate`` (if given)."""

    def __init__(self, path, pieces, gates=None, pause=0.002):
        threading.Thread.__init__(self, daemon=True)
        self.path = path
        self.pieces = pieces
        self.gates = gates or {}
        self.pause = pause
        self.done = threading.Event()

    def run(self):
        with open(self.path, "ab") as f:
            for i, piece in enumerate(self.pieces):
                gate = self.gates.get(i)
                if gate is not None:
                    gate.wait(30)
                f.write(piece)
                f.flush()
                time.sleep(self.pause)
        self.done.set()


def _pieces(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_follow_a_file_being_written_until_the_writer_says_done(tmp_path):
    data = _read("p1_real_silero_vad")
    path = tmp_path / "incoming.nnc"
    path.write_bytes(b"")
    writer = SlowWriter(path, _pieces(data, 7919))  # pieces end mid-unit and mid-nnr_unit_size()
    src = FileSource(path, 4096, follow=True, idle_timeout=0.01, poll_interval=0.001, complete=writer.done.is_set)
    writer.start()
    got = asyncio.run(_collect(nnc_edge.decode_stream(src)))
    writer.join()
    assert_same(got, expected("p1_real_silero_vad")[0])


def test_follow_waits_while_the_decoder_is_inside_a_unit(tmp_path):
    # The writer stops in the middle of an NNR unit and resumes only after the reader has seen the
    # file idle (complete() asked, decoder not at a boundary) several times: the stream must not end.
    data = _read("p1_model_dict")
    start, end, _ = unit_spans(data)[5]
    cut = (start + end) // 2
    path = tmp_path / "incoming.nnc"
    path.write_bytes(data[:cut])
    dec = nnc_edge.StreamDecoder()
    asked = []
    resume = threading.Event()

    def complete():
        asked.append(dec.at_boundary)
        if len(asked) == 3:
            resume.set()
        return dec.at_boundary

    writer = SlowWriter(path, [data[cut:]], gates={0: resume})
    writer.start()
    src = FileSource(path, 1000, follow=True, idle_timeout=0.0, poll_interval=0.001, complete=complete)
    got = asyncio.run(_collect(nnc_edge.decode_stream(src, decoder=dec)))
    writer.join()
    assert asked[:3] == [False, False, False] and asked[-1] is True
    assert_same(got, expected("p1_model_dict")[0])


def test_follow_also_waits_inside_a_partial_data_sequence(tmp_path):
    from test_stream import _partial_stream
    stream, start, sizes = _partial_stream()
    cut = start + sizes[0]  # a unit boundary, but the partial-data sequence is open
    path = tmp_path / "incoming.nnc"
    path.write_bytes(stream[:cut])
    dec = nnc_edge.StreamDecoder()
    resume = threading.Event()
    asked = []

    def complete():
        asked.append(dec.at_boundary)
        if len(asked) == 2:
            resume.set()
        return dec.at_boundary

    writer = SlowWriter(path, [stream[cut:]], gates={0: resume})
    writer.start()
    got = asyncio.run(_collect(nnc_edge.decode_stream(
        FileSource(path, 500, follow=True, idle_timeout=0.0, poll_interval=0.001, complete=complete), decoder=dec)))
    writer.join()
    assert asked[:2] == [False, False]
    assert_same(got, expected("p1_model_dict")[0])


def test_follow_a_stalled_writer_ends_with_the_truncation_error(tmp_path):
    data = _read("p1_model_dict")
    path = tmp_path / "incoming.nnc"
    path.write_bytes(data[:-7])
    dec = nnc_edge.StreamDecoder()
    src = FileSource(path, 1000, follow=True, idle_timeout=0.0, poll_interval=0.001, stall_timeout=0.05,
                     complete=lambda: dec.at_boundary)
    got = []

    async def main():
        async for item in nnc_edge.decode_stream(src, decoder=dec):
            got.append(item)

    with pytest.raises(NNCError) as info:
        asyncio.run(main())
    assert info.value.element == "nnr_unit"
    assert_same(got, expected("p1_model_dict")[0][:4])


def test_follow_waits_for_the_file_to_appear(tmp_path):
    data = _read("p1_model_dict")
    path = tmp_path / "later.nnc"
    appeared = threading.Event()

    def create():
        with open(path, "wb") as f:
            f.write(data)
        appeared.set()

    timer = threading.Timer(0.05, create)
    timer.start()
    src = FileSource(path, 1000, follow=True, idle_timeout=0.0, poll_interval=0.001, complete=appeared.is_set)
    got = asyncio.run(_collect(nnc_edge.decode_stream(src)))
    timer.join()
    assert_same(got, expected("p1_model_dict")[0])


def test_follow_refuses_a_rewritten_file(tmp_path):
    data = _read("p1_model_dict")
    path = tmp_path / "incoming.nnc"
    path.write_bytes(data[:1000])

    def complete():
        with open(path, "r+b") as f:  # the writer starts over instead of appending
            f.truncate(10)
        return False

    src = FileSource(path, 300, follow=True, idle_timeout=0.0, poll_interval=0.001, complete=complete)
    with pytest.raises(NNCError) as info:
        asyncio.run(_collect(src))
    assert info.value.offset == 1000 and "shrank" in str(info.value)
