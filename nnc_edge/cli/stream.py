"""``nnc-edge decode --stream``: the streaming path of the decode command (registered via cli.EXTENSIONS).

Tensors go from the input file through the streaming decoder's slice mode into a sink, slice by
slice, so memory depends on neither the model nor its largest tensor (``--slice-elements 0``: whole
tensors, as they come out of their NNR units). On a terminal, stderr shows a progress line (units,
tensors, bytes, bytes/s); it is quiet when stderr is not a TTY.
"""

import os
import sys
import time

from decoder_core import NNCError

from .. import modelio
from . import CommandError, EXIT_INVALID, alternative, arguments, invalid
from .decode import output_paths, topology_of
from ..sinks import open_sink
from ..streaming import DEFAULT_CHUNK_SIZE, DEFAULT_SLICE_ELEMENTS, StreamDecoder, iter_decode


class ProgressLine:
    """A one-line progress display on a terminal, redrawn at most every ``interval`` seconds."""

    def __init__(self, label, total, stream, first=(0, 0, 0), interval=0.1):
        self.label = label
        self.total = total
        self.stream = stream
        self.first = first  # the decoder's counters when this input started: they run over a whole chain
        self.interval = interval
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, nbytes, units, tensors, final=False):
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        done = nbytes - self.first[0]
        rate = done / max(now - self.start, 1e-6)
        text = "%s: %d units, %d tensors, %s / %s, %s/s" % (
            self.label, units - self.first[1], tensors - self.first[2], _size(done), _size(self.total), _size(rate))
        if self.total:
            width = 24
            filled = min(width, width * done // self.total)
            text = "[%s%s] %3d%% %s" % ("#" * filled, "." * (width - filled), 100 * done // self.total, text)
        self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        self.stream.flush()


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000.0


def _counted(items, counts):
    """Count tensors and parameters of whole tensors (name, array) or slices (name, shape, start, array)."""
    for item in items:
        if len(item) == 2 or item[2] == 0:
            counts[0] += 1
        counts[1] += item[-1].size
        yield item
        item = None  # not kept alive while the next tensor or slice decodes


@arguments("decode")
def _stream_arguments(parser):
    parser.add_argument("--stream", action="store_true",
                        help="decode while reading: tensors are decoded while their bytes arrive and written to "
                             "the output in slices, so memory depends on neither the model nor its largest "
                             "tensor; shows progress on a terminal")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                        help="with --stream: bytes read per step (default %(default)d)")
    parser.add_argument("--slice-elements", type=int, default=DEFAULT_SLICE_ELEMENTS, metavar="N",
                        help="with --stream: elements per slice (default %(default)d); 0 writes whole tensors, "
                             "each once its NNR unit is complete (memory then follows the largest tensor)")


@alternative("decode", "stream")
def run_decode_stream(args):
    if args.output is None:
        raise CommandError("-o/--output is required", EXIT_INVALID)
    if args.chunk_size < 1:
        raise CommandError("--chunk-size must be positive", EXIT_INVALID)
    if args.slice_elements < 0:
        raise CommandError("--slice-elements must be 0 (whole tensors) or positive, not %d" % args.slice_elements,
                           EXIT_INVALID)
    outputs = output_paths(args.inputs, args.output, args.format)
    if len(outputs) > 1 or outputs[0] != args.output:
        os.makedirs(args.output, exist_ok=True)
    # One state for the whole chain, as in plain decode.
    decoder = StreamDecoder(topology_of(args.topology), slice_elements=args.slice_elements or None)
    show = not args.quiet and sys.stderr.isatty()
    for path, out in zip(args.inputs, outputs):
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise CommandError("cannot read %s: %s" % (path, exc.strerror or exc))
        counts = [0, 0]
        with f:
            total = os.fstat(f.fileno()).st_size
            bar = ProgressLine(os.path.basename(path), total, sys.stderr, decoder.progress()) if show else None
            try:
                with open_sink(out) as sink:
                    sink.write_all(_counted(iter_decode(f, args.chunk_size, decoder=decoder,
                                                        progress=bar.update if bar else None), counts))
            except NNCError as exc:
                if bar:
                    sys.stderr.write("\n")
                raise invalid(path, exc)
            except modelio.ModelFormatError as exc:
                raise CommandError("cannot write %s: %s" % (out, exc), EXIT_INVALID)
            except OSError as exc:
                raise CommandError("cannot write %s: %s" % (out, exc.strerror or exc))
            if bar:
                bar.update(decoder.bytes, decoder.units, decoder.tensors, final=True)
        if not args.quiet:
            print("%s -> %s: %d tensor%s, %d parameters" % (path, out, counts[0], "" if counts[0] == 1 else "s",
                                                             counts[1]))
    return 0
