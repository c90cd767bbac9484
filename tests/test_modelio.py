"""nnc_edge.modelio: safetensors and .npz round trips, interoperability, and hostile files."""

import io
import json
import struct

import numpy as np
import pytest

from nnc_edge import modelio
from nnc_edge.modelio import ModelFormatError


def sample_tensors():
    rng = np.random.default_rng(7)
    return {
        "conv.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "conv.bias": np.array([-0.0, 1.5, np.inf, np.nan], dtype=np.float32),
        "count": np.array(7, dtype=np.int64),  # 0-d
        "empty": np.zeros((0, 3), dtype=np.int32),
        "half": np.arange(5, dtype=np.float16),
        "double": np.linspace(-1, 1, 6).reshape(2, 3),
        "mask": np.array([[True, False], [False, True]]),
        "bytes": np.arange(250, 256, dtype=np.uint8),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u16": np.arange(4, dtype=np.uint16),
        "i16": np.arange(-2, 2, dtype=np.int16),
        "u32": np.arange(3, dtype=np.uint32),
        "u64": np.array([2 ** 63], dtype=np.uint64),
        "file": np.ones(2, dtype=np.float32),  # a name numpy.savez would take as its own argument
    }


def assert_same(got, expected):
    assert list(got) == list(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype.newbyteorder("=") and have.shape == want.shape, name
        assert have.tobytes() == want.astype(have.dtype).tobytes(), name  # bit-exact, NaN and -0.0 included


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_keeps_values_dtypes_shapes_and_order(tmp_path, suffix):
    tensors = sample_tensors()
    path = tmp_path / ("model" + suffix)
    modelio.save(path, tensors)
    assert_same(modelio.load(path), tensors)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_non_contiguous_and_big_endian_input(tmp_path, suffix):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"t": base.T, "strided": base[::2, ::3], "big": np.arange(5, dtype=">i4")}
    path = tmp_path / ("m" + suffix)
    modelio.save(path, tensors)
    assert_same(modelio.load(path), tensors)


def test_loaded_safetensors_arrays_are_writable(tmp_path):
    path = tmp_path / "m.safetensors"
    modelio.save(path, {"a": np.zeros(3, np.float32)})
    a = modelio.load(path)["a"]
    a[0] = 1
    assert a.tolist() == [1, 0, 0]


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "m.safetensors"
    modelio.save(path, {"old": np.zeros(100, np.float32)})
    modelio.save(path, {"new": np.ones(2, np.int32)})
    assert_same(modelio.load(path), {"new": np.ones(2, np.int32)})


def test_safetensors_layout(tmp_path):
    # The format as specified: u64 LE header size, JSON header, data 8-byte aligned, offsets in order.
    path = tmp_path / "m.safetensors"
    modelio.save(path, {"b": np.array([1, 2], np.int32), "a": np.array([0.5], np.float64)}, metadata={"k": "v"})
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert (8 + size) % 8 == 0
    header = json.loads(raw[8:8 + size])
    assert header == {"__metadata__": {"k": "v"},
                      "b": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
                      "a": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}}
    assert raw[8 + size:] == struct.pack("<ii", 1, 2) + struct.pack("<d", 0.5)
    assert modelio.load_metadata(path) == {"k": "v"}


def test_written_safetensors_read_by_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    modelio.save(path, tensors, metadata={"format": "np"})
    got = st.load_file(str(path))
    assert sorted(got) == sorted(tensors)
    assert_same({k: got[k] for k in tensors}, tensors)


def test_reads_what_the_safetensors_package_writes(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    del tensors["empty"], tensors["count"]  # the package writer's support for these varies by version
    path = tmp_path / "m.safetensors"
    st.save_file(tensors, str(path), metadata={"origin": "safetensors"})
    got = modelio.load(path)
    assert sorted(got) == sorted(tensors)
    assert_same({k: got[k] for k in tensors}, tensors)
    assert modelio.load_metadata(path) == {"origin": "safetensors"}


@pytest.mark.parametrize("name", ["model.pt", "model", "model.npy", "model.safetensor"])
def test_unsupported_suffix(tmp_path, name):
    with pytest.raises(ModelFormatError, match="unsupported model file suffix"):
        modelio.save(tmp_path / name, {"a": np.zeros(1)})
    with pytest.raises(ModelFormatError, match="unsupported model file suffix"):
        modelio.load(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_suffix_is_case_insensitive(tmp_path):
    path = tmp_path / "M.SafeTensors"
    modelio.save(path, {"a": np.ones(2, np.float32)})
    assert_same(modelio.load(path), {"a": np.ones(2, np.float32)})


@pytest.mark.parametrize("tensors, message", [
    ({"o": np.array([object()])}, "dtype"),
    ({"c": np.zeros(2, np.complex64)}, "dtype"),
    ({1: np.zeros(2, np.float32)}, "names must be strings"),
    ({"__metadata__": np.zeros(2, np.float32)}, "reserved"),
])
def test_save_rejects_what_safetensors_cannot_hold(tmp_path, tensors, message):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ModelFormatError, match=message):
        modelio.save(path, tensors)
    assert list(tmp_path.iterdir()) == []


def test_npz_refuses_object_arrays(tmp_path):
    with pytest.raises(ModelFormatError, match="Python objects"):
        modelio.save(tmp_path / "m.npz", {"a": np.zeros(2), "o": np.array([None])})
    assert list(tmp_path.iterdir()) == []


def test_metadata_rules(tmp_path):
    with pytest.raises(ModelFormatError, match="strings"):
        modelio.save(tmp_path / "m.safetensors", {}, metadata={"n": 1})
    with pytest.raises(ModelFormatError, match="metadata"):
        modelio.save(tmp_path / "m.npz", {}, metadata={"k": "v"})
    assert list(tmp_path.iterdir()) == []


def test_empty_dicts(tmp_path):
    for name in ("e.safetensors", "e.npz"):
        modelio.save(tmp_path / name, {})
        assert modelio.load(tmp_path / name) == {}


# --- hostile safetensors files --------------------------------------------------------------------
def safetensors_file(header, data=b"", size=None, pad=True):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text) if size is None else size) + text + data


def read(raw):
    return modelio.read_safetensors(io.BytesIO(raw), len(raw))


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_minimal_hand_made_file_reads():
    got = read(safetensors_file({"x": entry()}, struct.pack("<2f", 1.0, -2.0)))
    assert got["x"].dtype == np.float32 and got["x"].tolist() == [1.0, -2.0]


@pytest.mark.parametrize("raw, message", [
    (b"", "too short"),
    (b"\x01\x02\x03", "too short"),
    (safetensors_file({}, size=1 << 63), "header length"),
    (safetensors_file({}, size=200_000_000), "header length"),
    (safetensors_file({"x": entry()}, b"\0" * 8, size=10_000), "header length"),
    (safetensors_file(b"\xff\xfe{}"), "not valid JSON"),
    (safetensors_file(b"{\"x\": "), "not valid JSON"),
    (safetensors_file(b"[" * 100000 + b"]" * 100000), "not valid JSON|not a JSON object"),
    (safetensors_file([1, 2]), "not a JSON object"),
    (safetensors_file(b'{"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},'
                      b' "x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'), "duplicate"),
    (safetensors_file({"__metadata__": {"k": 1}}), "__metadata__"),
    (safetensors_file({"__metadata__": [1]}), "__metadata__"),
    (safetensors_file({"x": [1]}), "exactly dtype"),
    (safetensors_file({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly dtype"),
    (safetensors_file({"x": dict(entry(), extra=1)}, b"\0" * 8), "exactly dtype"),
    (safetensors_file({"x": entry(dtype="BF16", offsets=(0, 4))}, b"\0" * 4), "unsupported dtype"),
    (safetensors_file({"x": entry(dtype="F33")}, b"\0" * 8), "unsupported dtype"),
    (safetensors_file({"x": entry(dtype=3)}, b"\0" * 8), "unsupported dtype"),
    (safetensors_file({"x": entry(shape=(-2,))}, b"\0" * 8), "invalid shape"),
    (safetensors_file({"x": entry(shape=(True, 2))}, b"\0" * 8), "invalid shape"),
    (safetensors_file({"x": entry(shape=(2.0,))}, b"\0" * 8), "invalid shape"),
    (safetensors_file({"x": dict(entry(), shape=2)}, b"\0" * 8), "invalid shape"),
    (safetensors_file({"x": entry(offsets=(0, 16))}, b"\0" * 8), "outside"),
    (safetensors_file({"x": entry(offsets=(8, 0))}, b"\0" * 8), "outside"),
    (safetensors_file({"x": entry(offsets=(-8, 0))}, b"\0" * 8), "outside"),
    (safetensors_file({"x": entry(offsets=(0,))}, b"\0" * 8), "outside"),
    (safetensors_file({"x": entry(offsets=(0, 8.0))}, b"\0" * 8), "outside"),
    (safetensors_file({"x": entry(shape=(1 << 40, 1 << 40), offsets=(0, 8))}, b"\0" * 8), "needs"),
    (safetensors_file({"x": entry(shape=(3,))}, b"\0" * 8), "needs"),
    (safetensors_file({"x": entry(offsets=(4, 12))}, b"\0" * 12), "gap or overlap"),
    (safetensors_file({"x": entry(), "y": entry()}, b"\0" * 8), "gap or overlap"),
    (safetensors_file({"x": entry()}, b"\0" * 9), "after the last tensor"),
])
def test_hostile_safetensors_headers_raise(raw, message):
    with pytest.raises(ModelFormatError, match=message):
        read(raw)


def test_truncated_safetensors_file(tmp_path):
    path = tmp_path / "m.safetensors"
    modelio.save(path, sample_tensors())
    raw = path.read_bytes()
    for cut in (0, 7, 8, 20, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelFormatError):
            modelio.load(path)


def test_read_stops_at_a_short_file_object():
    # A file object delivering fewer bytes than its stated size.
    raw = safetensors_file({"x": entry()}, b"\0" * 8)
    with pytest.raises(ModelFormatError, match="ends inside the tensor data"):
        modelio.read_safetensors(io.BytesIO(raw[:-3]), len(raw))


# --- hostile .npz files ---------------------------------------------------------------------------
def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(ModelFormatError):
        modelio.load(path)


def test_npz_holding_a_plain_npy(tmp_path):
    path = tmp_path / "m.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ModelFormatError, match="not a valid .npz archive"):
        modelio.load(path)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ModelFormatError) as info:
        modelio.load(path)
    assert str(info.value) == "%s: tensor 'x' holds Python objects, which a model file cannot hold" % path


def test_npz_truncated(tmp_path):
    path = tmp_path / "m.npz"
    modelio.save(path, sample_tensors())
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ModelFormatError):
        modelio.load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_tensor_shapes_come_from_the_headers(tmp_path, suffix, monkeypatch):
    path = str(tmp_path / ("m" + suffix))
    tensors = sample_tensors()
    modelio.save(path, tensors)
    monkeypatch.setattr(modelio, "load", None)  # shapes must not need the data
    shapes = modelio.tensor_shapes(path)
    assert list(shapes.items()) == [(name, a.shape) for name, a in tensors.items()]


def test_tensor_shapes_of_a_broken_archive(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFormatError, match="not a valid .npz archive"):
        modelio.tensor_shapes(str(path))
    with pytest.raises(FileNotFoundError):
        modelio.tensor_shapes(str(tmp_path / "missing.safetensors"))


# --- issue 16, finding 11: what numpy cannot hold is refused with the file's name ------------------
def deep_npz(path, dims):
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_2_0(member, {"descr": "<f4", "fortran_order": False, "shape": (1,) * dims})
    member.write(bytes(4))
    with zipfile.ZipFile(str(path), "w") as zf:
        zf.writestr("deep.npy", member.getvalue())


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_tensor_with_more_dimensions_than_numpy_allows_is_refused(tmp_path, suffix):
    path = tmp_path / ("m" + suffix)
    dims = modelio.MAX_DIMENSIONS + 1
    if suffix == ".npz":
        deep_npz(path, dims)
    else:
        path.write_bytes(modelio.safetensors_header([("deep", np.float32, [1] * dims)]) + bytes(4))
    message = "%s: tensor 'deep' has %d dimensions, more than the %d a numpy array can have" % (
        path, dims, modelio.MAX_DIMENSIONS)
    for read in (modelio.load, modelio.tensor_shapes):
        with pytest.raises(ModelFormatError) as info:
            read(path)
        assert str(info.value) == message
    deep_npz(tmp_path / "ok.npz", modelio.MAX_DIMENSIONS)
    assert modelio.load(tmp_path / "ok.npz")["deep"].shape == (1,) * modelio.MAX_DIMENSIONS


def test_an_npz_member_that_is_not_an_array_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "m.npz"
    with zipfile.ZipFile(str(path), "w") as zf:
        zf.writestr("readme.txt", "hello")
    for read in (modelio.load, modelio.tensor_shapes):
        with pytest.raises(ModelFormatError) as info:
            read(path)
        assert str(info.value) == "%s: member 'readme.txt' is not a .npy array" % path
