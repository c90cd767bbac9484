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


# --- slices (the slice mode of nnc_edge.streaming) -------------------------------------------------------
def _write(path, items, **options):
    with open_sink(path, **options) as sink:
        sink.write_all(items)
    return path.read_bytes()


@pytest.mark.parametrize("suffix, options", [(".safetensors", {}), (".npz", {}), (".npz", {"compress": True})],
                         ids=["safetensors", "npz", "npz-deflated"])
@pytest.mark.parametrize("case", ["p1_real_silero_vad", "p1_int_3d", "p1_entrypoints_scan2"])
def test_sinks_from_slices_are_byte_identical_to_sinks_from_whole_tensors(tmp_path, case, suffix, options):
    path = os.path.join(CONFORMANCE, case + ".nnc")
    whole = _write(tmp_path / ("whole" + suffix), nnc_edge.iter_decode(path), **options)
    for n in (1000, 4096):
        sliced = _write(tmp_path / ("sliced" + suffix), nnc_edge.iter_decode(path, 3000, slice_elements=n), **options)
        assert sliced == whole, n
    if not options:
        modelio.save(tmp_path / ("saved" + suffix), dict(_want(case)))
        assert whole == (tmp_path / ("saved" + suffix)).read_bytes()
    assert_same(list(modelio.load(tmp_path / ("sliced" + suffix)).items()), _want(case))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_slices_by_hand_of_every_kind_of_tensor(tmp_path, suffix):
    tensors = {"w": np.arange(35, dtype=np.float32).reshape(5, 7), "empty": np.zeros((0, 3), np.float32),
               "scalar": np.float32(2.5), "steps": np.arange(9, dtype=np.int64), "mask": np.array([True, False])}
    whole = _write(tmp_path / ("whole" + suffix), tensors.items())

    def slices():
        for name, array in tensors.items():
            flat = np.asarray(array).reshape(-1)
            yield name, np.shape(array), 0, flat[:4]
            for start in range(4, flat.size, 4):
                yield name, np.shape(array), start, flat[start:start + 4]

    assert _write(tmp_path / ("sliced" + suffix), slices()) == whole
    modelio.save(tmp_path / ("saved" + suffix), tensors)
    assert (tmp_path / ("saved" + suffix)).read_bytes() == whole


def test_slices_out_of_place_are_refused_and_nothing_is_left(tmp_path):
    w = np.arange(12, dtype=np.float32)
    bad_sequences = [
        [("w", (3, 4), 4, w[4:8])],                                  # the first slice not at 0
        [("w", (3, 4), 0, w[:4]), ("w", (3, 4), 8, w[8:])],          # a gap
        [("w", (3, 4), 0, w[:4]), ("v", (2,), 0, w[:2])],            # another tensor before w is complete
        [("w", (3, 4), 0, w[:8]), ("w", (3, 4), 8, w[:8])],          # beyond the tensor's end
        [("w", (3, 4), 0, w[:4]), ("w", (3, 4), 4, w[4:8].astype(np.int32))],  # another dtype
    ]
    for suffix in (".safetensors", ".npz"):
        for items in bad_sequences:
            with pytest.raises(ValueError) as info:
                with open_sink(tmp_path / ("x" + suffix)) as sink:
                    sink.write_all(items)
            assert "'w'" in str(info.value) and "x" + suffix in str(info.value)
            assert _listing(tmp_path) == []
        # A tensor still incomplete when the sink commits: refused, and the sink is discarded.
        sink = open_sink(tmp_path / ("x" + suffix))
        sink.write_slice("w", (3, 4), 0, w[:4])
        with pytest.raises(ValueError) as info:
            sink.close()
        assert "incomplete: 4 of its 12 elements" in str(info.value)
        assert _listing(tmp_path) == []


def _cut_in_largest_unit(case):
    from test_stream import unit_spans
    data = _read(case)
    start, end, _ = max(unit_spans(data), key=lambda span: span[1] - span[0])
    return data[:(start + end) // 2]


def _corrupt_end(case):
    data = bytearray(_read(case))
    data[-1] = 0  # terminate_cabac() fails when the last byte arrives, after the tensor's slices
    data[-2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("bad", ["truncated", "corrupt"])
def test_failed_slice_stream_leaves_target_untouched_and_no_temp_files(tmp_path, suffix, bad):
    data = _cut_in_largest_unit("p1_real_silero_vad") if bad == "truncated" else _corrupt_end("p1_large_2d")
    target = tmp_path / ("model" + suffix)
    for existing in (None, b"old model"):
        if existing is not None:
            target.write_bytes(existing)
        written = []

        def counted(items):
            for item in items:
                written.append(item[3].size)
                yield item

        with pytest.raises(NNCError):
            with open_sink(target) as sink:
                sink.write_all(counted(nnc_edge.iter_decode(io.BytesIO(data), 1000, slice_elements=64)))
        assert written  # slices were in the file before the stream failed
        if existing is None:
            assert _listing(tmp_path) == []
        else:
            assert target.read_bytes() == existing and _listing(tmp_path) == [target.name]


def test_callback_sink_takes_slices():
    model = {name: np.zeros_like(a) for name, a in _want()}
    events = []

    def load_slice(name, shape, start, array):
        assert model[name].shape == shape
        model[name].reshape(-1)[start:start + array.size] = array

    with CallbackSink(None, on_close=lambda: events.append("close"), on_slice=load_slice) as sink:
        sink.write_all(nnc_edge.iter_decode(SILERO, 8192, slice_elements=1000))
    assert events == ["close"]
    assert_same(list(model.items()), _want())
    with pytest.raises(ValueError) as info:
        CallbackSink(lambda name, array: None).write_slice("w", (2,), 0, np.zeros(2, np.float32))
    assert "no on_slice" in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_cli_decode_stream_writes_what_decode_writes(tmp_path, suffix):
    want = tmp_path / ("decode" + suffix)
    assert cli.main(["decode", SILERO, "-o", str(want), "-q"]) == 0
    for extra in ([], ["--slice-elements", "0"], ["--slice-elements", "7", "--chunk-size", "999"]):
        out = tmp_path / ("stream" + suffix)
        assert cli.main(["decode", SILERO, "-o", str(out), "--stream", "-q"] + extra) == 0
        assert out.read_bytes() == want.read_bytes(), extra


def test_cli_decode_stream_corrupt_input_keeps_the_old_output(tmp_path, capsys):
    bad = tmp_path / "bad.nnc"
    bad.write_bytes(_corrupt_end("p1_large_2d"))
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old model")
    assert cli.main(["decode", str(bad), "-o", str(out), "--stream", "--slice-elements", "64"]) == cli.EXIT_INVALID
    assert "bad.nnc" in capsys.readouterr().err
    assert out.read_bytes() == b"old model" and _listing(tmp_path) == ["bad.nnc", "model.safetensors"]
    assert cli.main(["decode", SILERO, "-o", str(out), "--stream", "--slice-elements", "-1"]) == cli.EXIT_INVALID
    assert "--slice-elements must be 0" in capsys.readouterr().err
