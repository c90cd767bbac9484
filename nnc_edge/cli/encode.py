"""``nnc-edge encode``: compress a .safetensors / .npz model into an NNR bitstream (registered via
cli.EXTENSIONS).

On a terminal, stderr shows a progress bar (parameters coded); it is quiet when stderr is not a TTY.
At the end one summary line goes to stdout: bytes in and out, bits per parameter, and the error of
the result, measured by decoding the written bitstream with our decoder and comparing it with the
input (PSNR against the largest magnitude of the float tensors, and the largest absolute error).
"""

import math
import os
import sys
import time

import numpy as np

from decoder_core import NNCError

from ..atomicfile import write_file
from . import EXIT_INVALID, CommandError, arguments, command, read_model
from ..decoding import decode
from ..encoder.encoding import Encoder, load_tensors
from .stream import _size


class EncodeProgress:
    """A progress bar of coded parameters on a terminal, redrawn at most every ``interval`` seconds."""

    def __init__(self, label, stream, interval=0.1):
        self.label = label
        self.stream = stream
        self.interval = interval
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done, total, name, final=False):
        now = time.monotonic()
        if not final and done < total and now - self.last < self.interval:
            return
        self.last = now
        width = 24
        filled = width * done // total if total else width
        rate = done / max(now - self.start, 1e-6)
        self.stream.write("\r[%s%s] %3d%% %s: %d / %d parameters, %.1f M/s %s\x1b[K" % (
            "#" * filled, "." * (width - filled), 100 * done // total if total else 100, self.label, done, total,
            rate / 1e6, name))
        if final or done >= total:
            self.stream.write("\n")
        self.stream.flush()


def error_stats(original, decoded):
    """(PSNR in dB or inf, largest absolute error, number of float parameters) of the decoded float
    tensors against the original ones (as float32); integer tensors must come back exactly."""
    squared = 0.0
    count = 0
    peak = 0.0
    max_error = 0.0
    for name, array in original:
        if name not in decoded:
            raise CommandError("the decoded bitstream has no tensor %r" % name, EXIT_INVALID)
        out = decoded[name].reshape(array.shape)
        if array.dtype.kind in "iub":
            if not np.array_equal(out, array.astype(np.int64)):
                raise CommandError("integer tensor %r does not decode to its values" % name, EXIT_INVALID)
            continue
        ref = array.astype(np.float32).astype(np.float64)
        diff = out.astype(np.float64) - ref
        squared += float(np.dot(diff.reshape(-1), diff.reshape(-1)))
        count += ref.size
        peak = max(peak, float(np.abs(ref).max()))
        max_error = max(max_error, float(np.abs(diff).max()))
    if count == 0 or squared == 0.0:
        return math.inf, max_error, count
    mse = squared / count
    return (10.0 * math.log10(peak * peak / mse) if peak else -math.inf), max_error, count


def _nonweight_qp(text):
    if text == "default":
        return "default"
    if text == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise CommandError("--nonweight-qp must be an integer, 'default' or 'none', not %r" % text, EXIT_INVALID)


@command("encode", help="compress a .safetensors / .npz model into an NNR bitstream",
         description="Compress the tensors of a .safetensors or .npz model into an NNR bitstream (ISO/IEC "
                     "15938-17), one NDU per tensor in file order. Float tensors are quantized (dependent "
                     "quantization at --qp by default; 1-D tensors at the finer --nonweight-qp), integer "
                     "tensors are kept exactly. Prints a summary: bytes in/out, bits per parameter, and "
                     "the PSNR and largest absolute error of the decoded result against the input.",
         examples=("nnc-edge encode model.safetensors -o model.nnc",
                   "nnc-edge encode model.npz -o model.nnc --qp -38 --scan-order 2",
                   "nnc-edge encode model.safetensors -o model.nnc --max-unit-bytes 65536 --aggregate",
                   "nnc-edge encode model.safetensors -o model.nnc --profile 0 --no-dq --codebook 2"))
def run_encode(args):
    if args.output is None:
        raise CommandError("-o/--output is required", EXIT_INVALID)
    started = time.monotonic()
    try:
        tensors = load_tensors(read_model(args.model))
    except (ValueError, TypeError) as exc:
        raise CommandError("%s: %s" % (args.model, exc), EXIT_INVALID)
    options = {"qp": args.qp, "qp_density": args.qp_density, "nonweight_qp": _nonweight_qp(args.nonweight_qp),
               "dq": args.dq, "codebook": args.codebook, "bitdepth": args.bitdepth, "scan_order": args.scan_order,
               "max_unit_bytes": args.max_unit_bytes, "row_skip": args.row_skip, "raw_float": args.raw_float,
               "lambda_scale": args.lambda_scale, "block": args.block,
               "aggregate": True if args.aggregate == 0 else (args.aggregate or False)}
    show = not args.quiet and sys.stderr.isatty()
    bar = EncodeProgress(os.path.basename(args.model), sys.stderr) if show else None
    try:
        encoder = Encoder(profile=args.profile, threads=args.threads)
        data = encoder.encode(tensors, progress=bar, **options)
    except (NNCError, ValueError, TypeError) as exc:
        if bar:
            sys.stderr.write("\n")
        raise CommandError("%s: %s" % (args.model, exc), EXIT_INVALID)
    try:
        write_file(args.output, data)
    except OSError as exc:
        raise CommandError("cannot write %s: %s" % (args.output, exc.strerror or exc))
    if args.quiet:
        return 0
    psnr, max_error, floats = error_stats(tensors, decode(data))
    params = sum(int(a.size) for _, a in tensors)
    size_in = os.path.getsize(args.model)
    quality = "exact" if math.isinf(psnr) and psnr > 0 else "PSNR %.2f dB, max abs error %.3g" % (psnr, max_error)
    print("%s -> %s: %d tensor%s, %d parameters, %s -> %s (%.2fx), %.3f bits/parameter, %s, %.1f s"
          % (args.model, args.output, len(tensors), "" if len(tensors) == 1 else "s", params, _size(size_in),
             _size(len(data)), size_in / max(len(data), 1), 8.0 * len(data) / max(params, 1),
             quality if floats else "exact (integer tensors only)", time.monotonic() - started))
    return 0


@arguments("encode")
def _encode_arguments(parser):
    parser.add_argument("model", metavar="MODEL", help="the model to compress (.safetensors or .npz)")
    parser.add_argument("-o", "--output", metavar="OUT", help="the bitstream to write (.nnc)")
    parser.add_argument("--qp", type=int, default=-32,
                        help="quantization parameter of weights (2 or more dimensions); lower is finer "
                             "(default %(default)d)")
    parser.add_argument("--qp-density", type=int, default=2, choices=range(8), metavar="{0..7}",
                        help="qp steps per doubling of the step size is 2^qp_density (default %(default)d)")
    parser.add_argument("--nonweight-qp", default="default", metavar="QP",
                        help="qp of 1-D tensors (biases, norms): an integer, 'default' (NNCodec's -75 at "
                             "qp-density 2) or 'none' (qp - 2^(qp_density+1))")
    parser.add_argument("--dq", dest="dq", action="store_true", default=True,
                        help="dependent quantization, the 8-state trellis (default)")
    parser.add_argument("--no-dq", dest="dq", action="store_false", help="uniform quantization")
    parser.add_argument("--codebook", type=int, default=0, choices=(0, 1, 2),
                        help="0 off (default), 1 always, 2 where it makes a tensor's NDU smaller")
    parser.add_argument("--bitdepth", type=int, default=None, metavar="BITS",
                        help="integer-aligned quantization to this many bits per level (qp chosen per tensor)")
    parser.add_argument("--scan-order", type=int, default=0, choices=range(5), metavar="{0..4}",
                        help="block scan with entry points (blocks of 4 << N rows; 0: raster, default)")
    parser.add_argument("--max-unit-bytes", type=int, default=None, metavar="BYTES",
                        help="split larger NDUs into partial-data units of at most this many bytes")
    parser.add_argument("--aggregate", type=int, nargs="?", const=0, default=None, metavar="N",
                        help="pack consecutive NDUs into NNR_AGG units with entry points (at most N units "
                             "each; by default as many as fit --max-unit-bytes)")
    parser.add_argument("--block", action="store_true",
                        help="code X.weight with X.bias as one NNR_PT_BLOCK NDU")
    parser.add_argument("--profile", type=int, default=1, choices=(0, 1),
                        help="general_profile_idc (default 1, as NNCodec)")
    parser.add_argument("--no-row-skip", dest="row_skip", action="store_false", default=True,
                        help="never signal row skipping (profile 1)")
    parser.add_argument("--no-raw-float", dest="raw_float", action="store_false", default=True,
                        help="never send a float tensor uncompressed (NNR_PT_RAW_FLOAT)")
    parser.add_argument("--lambda-scale", type=float, default=0.0, metavar="X",
                        help="rate term of the trellis (0: distortion only, as NNCodec; default)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="tensors coded at the same time (default: the number of CPUs)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
