"""Reading and writing tensor dicts: safetensors and numpy .npz, chosen by the file suffix.

Both are implemented here without the ``safetensors`` package. Tensors keep their order: the
writers store them in dict order and the readers return them in stored order.

safetensors layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data
after the header, an optional "__metadata__" string map beside them), then the raw little-endian
tensor bytes, row-major, with neither gaps nor overlaps.
"""

import json
import os
import zipfile
import zlib

import numpy as np

from .atomicfile import replacing

SUFFIXES = (".safetensors", ".npz")

# safetensors dtype names <-> numpy (bfloat16 and the float8 types have no numpy dtype).
_ST_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "F32": np.float32, "F64": np.float64,
}
_ST_NAMES = {np.dtype(t): name for name, t in _ST_DTYPES.items()}

# The safetensors reference refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
# numpy arrays have at most this many dimensions (32 before numpy 2.0): a file's tensor with more is
# refused while its header is read, with the file's name, not by numpy's reshape.
MAX_DIMENSIONS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
_METADATA = "__metadata__"


class ModelFormatError(ValueError):
    """A model file that cannot be read or written in the format its suffix names."""


def format_of(path):
    """The format ("safetensors" or "npz") named by path's suffix; ModelFormatError otherwise."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in SUFFIXES:
        raise ModelFormatError("%s: unsupported model file suffix %r (use %s)"
                               % (path, suffix, " or ".join(SUFFIXES)))
    return suffix[1:]


def save(path, tensors, metadata=None):
    """Write a dict name -> array to path (.safetensors or .npz), replacing the file atomically.

    ``metadata`` (a str -> str dict) is stored in the safetensors header; .npz has no place for it.
    """
    fmt = format_of(path)
    if fmt == "npz" and metadata:
        raise ModelFormatError("%s: .npz files cannot hold metadata" % path)
    with replacing(path) as f:
        write(f, fmt, tensors, metadata)


def write(f, fmt, tensors, metadata=None):
    """Write a dict name -> array to the binary file ``f`` in the format ``fmt`` ("safetensors" or
    "npz", see format_of)."""
    if fmt == "safetensors":
        write_safetensors(f, tensors, metadata)
    else:
        _write_npz(f, tensors)


def load(path):
    """Read a .safetensors or .npz file into a dict name -> numpy array, in stored order."""
    fmt = format_of(path)
    if fmt == "safetensors":
        with open(path, "rb") as f:
            return read_safetensors(f, os.fstat(f.fileno()).st_size, path)
    return _load_npz(path)


def tensor_shapes(path):
    """name -> shape of every tensor of a .safetensors or .npz file, in stored order, read from the
    headers alone (the tensor data is not read)."""
    if format_of(path) == "safetensors":
        with open(path, "rb") as f:
            return {name: shape for _, _, name, _, shape in read_safetensors_layout(f, path)[0]}
    return {name: shape for name, shape, _ in _npz_members(path, read=False)}


def load_metadata(path):
    """The "__metadata__" string map of a .safetensors file ({} when it has none)."""
    with open(path, "rb") as f:
        return read_safetensors_layout(f, path)[1]


def read_safetensors_layout(f, where="<safetensors>"):
    """The validated header of the .safetensors file open as the binary file f, without its data:
    ([(begin, end, name, numpy dtype, shape)] in data order, metadata, file offset of the data).
    Offsets are relative to the data; the tensors tile it without gaps (the file's size is checked)."""
    f.seek(0)
    return _read_safetensors_header(f, os.fstat(f.fileno()).st_size, where)


# --- safetensors ----------------------------------------------------------------------------------
def _little_endian(name, array):
    """array as a C-contiguous little-endian numpy array, which both formats store."""
    if not isinstance(name, str):
        raise ModelFormatError("tensor names must be strings, not %r" % (name,))
    array = np.asarray(array)
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")


def _check_dimensions(where, name, shape):
    if len(shape) > MAX_DIMENSIONS:
        raise ModelFormatError("%s: tensor %r has %d dimensions, more than the %d a numpy array can have"
                               % (where, name, len(shape), MAX_DIMENSIONS))


def _holds_objects(name):
    return ModelFormatError("tensor %r holds Python objects, which a model file cannot hold" % (name,))


def _contiguous_array(name, array):
    if name == _METADATA:
        raise ModelFormatError("%r is reserved by the safetensors format" % _METADATA)
    array = _little_endian(name, array)
    if array.dtype.newbyteorder("=") not in _ST_NAMES:
        raise ModelFormatError("tensor %r has dtype %s, which safetensors cannot store here" % (name, array.dtype))
    return array


def write_safetensors(f, tensors, metadata=None):
    """Write tensors (and an optional str -> str metadata map) to the binary file object f."""
    arrays = [_contiguous_array(name, array) for name, array in tensors.items()]
    f.write(safetensors_header([(name, a.dtype, a.shape) for name, a in zip(tensors, arrays)], metadata))
    for array in arrays:
        f.write(array.reshape(-1).view(np.uint8))


def safetensors_header(layout, metadata=None):
    """The 8-byte length and padded JSON header of a safetensors file whose data holds, back to
    back in this order, the tensors of ``layout``: (name, numpy dtype, shape) triples.
    (Also used by nnc_edge.sinks, which writes the data before it knows the header.)"""
    header = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ModelFormatError("safetensors metadata must map strings to strings")
        header[_METADATA] = dict(metadata)
    offset = 0
    for name, dtype, shape in layout:
        if name in header:
            raise ModelFormatError("duplicate tensor name %r" % (name,))
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": _ST_NAMES[dtype.newbyteorder("=")], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ModelFormatError("duplicate key %r in the safetensors header" % key)
        out[key] = value
    return out


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _read_safetensors_header(f, file_size, where):
    """Validate the header: returns ([(begin, end, name, dtype, shape)] sorted by offset, metadata, data start)."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ModelFormatError("%s: too short for a safetensors header length" % where)
    size = int.from_bytes(prefix, "little")
    if size > MAX_HEADER_BYTES or size > file_size - 8:
        raise ModelFormatError("%s: safetensors header length %d exceeds the file or the %d byte limit"
                               % (where, size, MAX_HEADER_BYTES))
    try:
        header = json.loads(f.read(size).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFormatError("%s: safetensors header is not valid JSON (%s)" % (where, exc))
    if not isinstance(header, dict):
        raise ModelFormatError("%s: safetensors header is not a JSON object" % where)
    metadata = header.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFormatError("%s: safetensors __metadata__ must map strings to strings" % where)
    data_size = file_size - 8 - size
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ModelFormatError("%s: tensor %r needs exactly dtype, shape and data_offsets" % (where, name))
        dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise ModelFormatError("%s: tensor %r has unsupported dtype %r" % (where, name, info["dtype"]))
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ModelFormatError("%s: tensor %r has an invalid shape %r" % (where, name, shape))
        _check_dimensions(where, name, shape)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ModelFormatError("%s: tensor %r has data_offsets %r outside the %d data bytes"
                                   % (where, name, offsets, data_size))
        nbytes = np.dtype(dtype).itemsize
        for d in shape:
            nbytes *= d
        if nbytes != offsets[1] - offsets[0]:
            raise ModelFormatError("%s: tensor %r of shape %r needs %d bytes but data_offsets span %d"
                                   % (where, name, shape, nbytes, offsets[1] - offsets[0]))
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise ModelFormatError("%s: tensor %r starts at data byte %d, %d expected (gap or overlap)"
                                   % (where, name, begin, position))
        position = end
    if position != data_size:
        raise ModelFormatError("%s: %d data bytes after the last tensor" % (where, data_size - position))
    return entries, metadata, 8 + size


def read_safetensors(f, file_size, where="<safetensors>"):
    """Read safetensors from the binary file object f of file_size bytes: dict name -> array."""
    entries, _, _ = _read_safetensors_header(f, file_size, where)
    data = bytearray(entries[-1][1] if entries else 0)  # one writable buffer the arrays share
    if f.readinto(data) != len(data):
        raise ModelFormatError("%s: file ends inside the tensor data" % where)
    out = {}
    for begin, end, name, dtype, shape in entries:
        little = np.dtype(dtype).newbyteorder("<")
        array = np.frombuffer(data, dtype=little, count=(end - begin) // little.itemsize, offset=begin)
        out[name] = array.astype(np.dtype(dtype), copy=False).reshape(shape)
    return out


# --- npz ------------------------------------------------------------------------------------------
def _write_npz(f, tensors):
    # numpy.savez takes the names as keyword arguments, which breaks for names like "file": write
    # the same zip of .npy members directly.
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in tensors.items():
            array = _little_endian(name, array)
            if array.dtype.hasobject:
                raise _holds_objects(name)
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _load_npz(path):
    return {name: data for name, _, data in _npz_members(path, read=True)}


def _npz_members(path, read):
    """(name, shape, array or None) of every member of an .npz archive, in stored order; each header
    is checked before its data is read (with ``read``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [_npz_member(path, zf, member, read) for member in zf.namelist()]
    except ModelFormatError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as exc:
        raise ModelFormatError("%s: not a valid .npz archive (%s)" % (path, exc))


def _npz_member(path, zf, member, read):
    if not member.endswith(".npy"):
        raise ModelFormatError("%s: member %r is not a .npy array" % (path, member))
    name = member[:-4]
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    _check_dimensions(path, name, shape)
    if dtype.hasobject:
        raise ModelFormatError("%s: %s" % (path, _holds_objects(name)))
    if not read:
        return name, tuple(shape), None
    with zf.open(member) as f:
        return name, tuple(shape), np.lib.format.read_array(f, allow_pickle=False)
