"""``nnc-edge decode --stream``: the streaming path of the decode command (registered via cli.EXTENSIONS).

Tensors go from the input file through the streaming decoder into a sink one at a time, so memory
follows the largest tensor, not the model. On a terminal, stderr shows a progress line (units,
tensors, bytes, bytes/s); it is quiet when stderr is not a TTY.
"""

import os
import sys
import time

from decoder_core import NNCError

from . import modelio
from .cli import CommandError, EXIT_INVALID, alternative, arguments, invalid, output_paths, topology_of
from .sinks import open_sink
from .streaming import DEFAULT_CHUNK_SIZE, StreamDecoder, iter_decode


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
    for item in items:
        counts[0] += 1
        counts[1] += item[1].size
        yield item
        item = None  # not kept alive while the next tensor decodes


@arguments("decode")
def _stream_arguments(parser):
    parser.add_argument("--stream", action="store_true",
                        help="decode while reading: each tensor is written to the output as soon as its NNR "
                             "unit is complete, so memory follows the largest tensor, not the model; shows "
                             "progress on a terminal")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                        help="with --stream: bytes read per step (default %(default)d)")


@alternative("decode", "stream")
def run_decode_stream(args):
    if args.output is None:
        raise CommandError("-o/--output is required", EXIT_INVALID)
    if args.chunk_size < 1:
        raise CommandError("--chunk-size must be positive", EXIT_INVALID)
    outputs = output_paths(args.inputs, args.output, args.format)
    if len(outputs) > 1 or outputs[0] != args.output:
        os.makedirs(args.output, exist_ok=True)
    decoder = StreamDecoder(topology_of(args.topology))  # one state for the whole chain, as in plain decode
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
