"""Sinks for streamed tensors (nnc_edge.sinks) and ``nnc-edge decode --stream``."""

import asyncio
import io
import os
import weakref

import numpy as np
import pytest
import safetensors.numpy

import nnc_edge
from decoder_core import NNCError
from nnc_edge import cli, modelio
from nnc_edge.sinks import CallbackSink, NpzSink, SafetensorsSink, open_sink

from test_stream import CONFORMANCE, _aiter, _chunks, _read, assert_same, expected

SILERO = os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc")


def _want(case="p1_real_silero_vad"):
    return expected(case)[0]


def _listing(directory):
    return sorted(os.listdir(directory))


def test_safetensors_sink_writes_the_same_file_as_modelio(tmp_path):
    target = tmp_path / "model.safetensors"
    with SafetensorsSink(target) as sink:
        assert sink.write_all(nnc_edge.iter_decode(SILERO, 5000)) == len(_want())
    assert _listing(tmp_path) == ["model.safetensors"]
    # Same tensors as the whole-buffer decoder, readable by the safetensors package ...
    loaded = safetensors.numpy.load_file(str(target))
    assert_same([(k, loaded[k]) for k, _ in _want()], _want())
    assert_same(list(modelio.load(target).items()), _want())
    # ... and byte for byte what the non-streaming writer produces.
    modelio.save(tmp_path / "ref.safetensors", dict(_want()))
    assert target.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_safetensors_sink_metadata_and_empty(tmp_path):
    with SafetensorsSink(tmp_path / "m.safetensors", metadata={"source": "p1_model_dict"}) as sink:
        sink.write_all(nnc_edge.iter_decode(os.path.join(CONFORMANCE, "p1_model_dict.nnc")))
    assert modelio.load_metadata(tmp_path / "m.safetensors") == {"source": "p1_model_dict"}
    assert_same(list(modelio.load(tmp_path / "m.safetensors").items()), _want("p1_model_dict"))
    with SafetensorsSink(tmp_path / "empty.safetensors"):
        pass
    assert modelio.load(tmp_path / "empty.safetensors") == {}


@pytest.mark.parametrize("compress", [False, True])
def test_npz_sink(tmp_path, compress):
    target = tmp_path / "model.npz"
    with NpzSink(target, compress=compress) as sink:
        sink.write_all(nnc_edge.iter_decode(SILERO, 777))
    assert _listing(tmp_path) == ["model.npz"]
    with np.load(target, allow_pickle=False) as npz:
        assert_same([(k, npz[k]) for k in npz.files], _want())


def test_sinks_from_decode_stream(tmp_path):
    async def main():
        for name in ("a.safetensors", "b.npz"):
            with open_sink(tmp_path / name) as sink:
                await sink.write_all_async(nnc_edge.decode_stream(_aiter(_chunks(_read("p1_model_dict"), 99, None))))

    asyncio.run(main())
    for name in ("a.safetensors", "b.npz"):
        assert_same(list(modelio.load(tmp_path / name).items()), _want("p1_model_dict"))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_failed_decode_leaves_target_untouched_and_no_temp_files(tmp_path, suffix):
    data = _read("p1_real_silero_vad")
    target = tmp_path / ("model" + suffix)
    # No target before: none after.
    with pytest.raises(NNCError):
        with open_sink(target) as sink:
            sink.write_all(nnc_edge.iter_decode(io.BytesIO(data[:-100]), 4096))
    assert _listing(tmp_path) == []
    # An existing target keeps its bytes.
    target.write_bytes(b"old model")
    with pytest.raises(NNCError):
        with open_sink(target) as sink:
            sink.write_all(nnc_edge.iter_decode(io.BytesIO(data[:len(data) // 2]), 4096))
    assert target.read_bytes() == b"old model"
    assert _listing(tmp_path) == [target.name]
    # Duplicate names (two streams into one file) are refused the same way.
    with pytest.raises(modelio.ModelFormatError):
        with open_sink(target) as sink:
            for _ in range(2):
                sink.write_all(nnc_edge.iter_decode(os.path.join(CONFORMANCE, "p1_model_dict.nnc")))
    assert target.read_bytes() == b"old model"
    assert _listing(tmp_path) == [target.name]


def test_abort_and_closed_sink(tmp_path):
    sink = SafetensorsSink(tmp_path / "x.safetensors")
    sink.write("a", np.zeros(3, np.float32))
    sink.abort()
    assert _listing(tmp_path) == []
    with pytest.raises(ValueError):
        sink.write("b", np.zeros(3, np.float32))
    sink = NpzSink(tmp_path / "x.npz")
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError):
        sink.write("b", np.zeros(3, np.float32))
    with np.load(tmp_path / "x.npz") as npz:
        assert npz.files == []


def test_callback_sink_loads_a_live_model():
    # A stand-in for a PyTorch module's parameters: preallocated arrays updated in place.
    model = {name: np.zeros_like(a) for name, a in _want()}
    events = []

    def load(name, array):
        np.copyto(model[name], array)

    with CallbackSink(load, on_close=lambda: events.append("close"), on_abort=lambda: events.append("abort")) as sink:
        sink.write_all(nnc_edge.iter_decode(SILERO, 8192))
    assert events == ["close"]
    assert_same(list(model.items()), _want())
    with pytest.raises(NNCError):
        with CallbackSink(load, on_abort=lambda: events.append("abort")) as sink:
            sink.write_all(nnc_edge.iter_decode(io.BytesIO(_read("p1_real_silero_vad")[:-1])))
    assert events == ["close", "abort"]


def test_write_all_holds_one_tensor_at_a_time():
    # Bounded memory: by the time the source produces tensor k + 1, tensor k is gone (the sink
    # here keeps nothing), so two large tensors are never alive at once because of the loop.
    alive = []

    def source():
        for name, array in _want():
            copy = array.copy()
            ref = weakref.ref(copy)
            yield name, copy
            del copy  # reference counting frees it now unless someone else holds it
            alive.append(ref() is not None)

    CallbackSink(lambda name, array: None).write_all(source())
    assert alive == [False] * len(_want())


# --- nnc-edge decode --stream --------------------------------------------------------------------------
def test_cli_decode_stream(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert cli.main(["decode", SILERO, "-o", str(out), "--stream", "--chunk-size", "3000"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # not a terminal: no progress display
    assert "15 tensors" in captured.out
    assert_same(list(modelio.load(out).items()), _want())
    assert _listing(tmp_path) == ["model.safetensors"]


def test_cli_decode_stream_chain_into_directory(tmp_path, capsys):
    steps = [os.path.join(CONFORMANCE, "p1_tca_%d.nnc" % i) for i in range(4)]
    assert cli.main(["decode"] + steps + ["-o", str(tmp_path / "out"), "--stream", "--format", "npz", "-q"]) == 0
    assert capsys.readouterr().out == ""
    for i, want in enumerate(expected("p1_tca")):
        assert_same(list(modelio.load(tmp_path / "out" / ("p1_tca_%d.npz" % i)).items()), want)


def test_cli_decode_stream_truncated_input(tmp_path, capsys):
    bad = tmp_path / "bad.nnc"
    bad.write_bytes(_read("p1_real_silero_vad")[:-5])
    out = tmp_path / "model.safetensors"
    assert cli.main(["decode", str(bad), "-o", str(out), "--stream"]) == cli.EXIT_INVALID
    assert "stream ends inside an NNR unit" in capsys.readouterr().err
    assert _listing(tmp_path) == ["bad.nnc"]
    assert cli.main(["decode", str(tmp_path / "missing.nnc"), "-o", str(out), "--stream"]) == cli.EXIT_IO
