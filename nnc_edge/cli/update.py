"""``nnc-edge update`` and ``nnc-edge apply``: incremental model updates (registered via cli.EXTENSIONS).

``update`` codes the difference between two model files into an update bitstream on the host;
``apply`` checks and applies updates to a model file on the device, atomically. See nnc_edge.updates.
"""

import argparse
import contextlib
import os

from decoder_core import NNCError

from .. import modelio
from ..atomicfile import Batch
from . import CommandError, EXIT_INVALID, arguments, check_readable, command, read_model
from ..streaming import DEFAULT_CHUNK_SIZE
from ..updates import AnonymousUpdateError, ChainState, apply_update, encode_update, model_digest, read_update_info


def _fraction(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError("must be in [0, 1), not %s" % text)
    return value


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, not %s" % text)
    return value


# --- update ---------------------------------------------------------------------------------------
@command("update", help="code the difference between two models as an update bitstream",
         description="Code NEW - BASE (float32) as an NNR update bitstream for a device that runs BASE. "
                     "Unchanged tensors are left out; --sparsity and --row-sparsity zero the smallest "
                     "differences (row sparsity whole rows, which row skipping then removes). The stream "
                     "carries an update record (parent and result digests, sequence number) that "
                     "'nnc-edge apply' checks. With --residual STATE updates form a chain: the state file "
                     "(created on first use) keeps the sequence number, the encoder and decoder state for "
                     "temporal context adaptation, and the quantization error, which is added to the next "
                     "update (error feedback). BASE must then be the model the previous update produced "
                     "(write it with --result).",
         examples=("nnc-edge update --base model.safetensors --new tuned.safetensors -o update.nnc",
                   "nnc-edge update --base m0.safetensors --new t1.safetensors -o u1.nnc --residual chain.state "
                   "--result m1.safetensors",
                   "nnc-edge update --base m1.safetensors --new t2.safetensors -o u2.nnc --residual chain.state "
                   "--result m2.safetensors --sparsity 0.5"))
def run_update(args):
    base = read_model(args.base)
    new = read_model(args.new)
    residual = None
    if args.residual is not None:
        if os.path.exists(args.residual):
            try:
                residual = ChainState.load(args.residual)
            except NNCError as exc:
                raise CommandError(str(exc), EXIT_INVALID)
            except OSError as exc:
                raise CommandError("cannot read %s: %s" % (args.residual, exc.strerror or exc))
        else:
            residual = ChainState(model_digest(base))
    result_format = _model_format(args.result) if args.result is not None else None
    # All outputs or none: each one's temporary file is made before the (slow) encoding, so that an
    # output that cannot be written is found before anything is written; all are renamed at the end.
    with _outputs() as batch:
        for path in (args.output, args.result, args.residual):
            if path is not None:
                batch.add(path)
        try:
            data, model = encode_update(base, new, qp=args.qp, dq=args.dq, sparsity=args.sparsity,
                                        row_sparsity=args.row_sparsity, tca=args.tca, hdsp=args.hdsp,
                                        residual=residual, error_feedback=args.error_feedback, sequence=args.sequence,
                                        nncodec_compatible=args.nncodec_compatible, return_model=True)
        except ValueError as exc:  # NNCError included: inputs that cannot be coded
            raise CommandError(str(exc), EXIT_INVALID)
        batch.write(args.output, lambda f: f.write(data))
        if args.result is not None:
            batch.write(args.result, lambda f: modelio.write(f, result_format, model))
        if residual is not None:
            batch.write(args.residual, lambda f: residual.write(f, args.residual))
        batch.commit()
    info = read_update_info(data)
    if not args.quiet:
        changed = sum(1 for name in base if model[name] is not base[name])
        print("%s: update %d, %d bytes, %d of %d tensors changed; applies to %s, produces %s"
              % (args.output, info.sequence, len(data), changed, len(base), info.parent.hex()[:16],
                 info.result.hex()[:16]))
    return 0


def _model_format(path):
    try:
        return modelio.format_of(path)
    except modelio.ModelFormatError as exc:
        raise CommandError(str(exc), EXIT_INVALID)


@contextlib.contextmanager
def _outputs():
    """An atomicfile.Batch whose write errors become CommandErrors that name the output."""
    try:
        with Batch() as batch:
            yield batch
    except modelio.ModelFormatError as exc:
        raise CommandError(str(exc), EXIT_INVALID)
    except OSError as exc:
        raise CommandError("cannot write %s: %s" % (exc.filename, exc.strerror or exc))


@arguments("update")
def _update_arguments(parser):
    parser.add_argument("--base", required=True, metavar="BASE",
                        help="the model the device runs (.safetensors or .npz)")
    parser.add_argument("--new", required=True, metavar="NEW", help="the model the device should run")
    parser.add_argument("-o", "--output", required=True, metavar="UPDATE", help="the update bitstream to write")
    parser.add_argument("--qp", type=int, default=-32,
                        help="quantization parameter of the differences (default %(default)s; 1-D tensors "
                             "use the finer -75 as NNCodec does)")
    parser.add_argument("--no-dq", dest="dq", action="store_false", help="uniform instead of dependent quantization")
    parser.add_argument("--sparsity", type=_fraction, default=None, metavar="F",
                        help="zero this fraction of each tensor's differences, smallest magnitudes first")
    parser.add_argument("--row-sparsity", type=_fraction, default=None, metavar="F",
                        help="zero this fraction of each tensor's rows, smallest L2 norm of the difference first")
    parser.add_argument("--tca", action=argparse.BooleanOptionalAction, default=True,
                        help="temporal context adaptation against the previous update of the chain (default on)")
    parser.add_argument("--hdsp", action=argparse.BooleanOptionalAction, default=None,
                        help="history-dependent significance probabilities where they make an NDU smaller "
                             "(default on, off with --nncodec-compatible)")
    parser.add_argument("--residual", metavar="STATE",
                        help="chain state file (created when missing): sequence numbers, encoder and decoder "
                             "state, and the residual for error feedback")
    parser.add_argument("--no-error-feedback", dest="error_feedback", action="store_false",
                        help="with --residual: do not add the kept quantization error to this update")
    parser.add_argument("--sequence", type=_positive, default=None, metavar="N",
                        help="sequence number of a stand-alone update (default 1; with --residual it follows the "
                             "chain)")
    parser.add_argument("--result", metavar="MODEL",
                        help="also write the model the device will have after this update (BASE + the decoded "
                             "update, bit-exact)")
    parser.add_argument("--nncodec-compatible", action="store_true",
                        help="carry the update record in the MPS base_model_id only, so NNCodec can decode "
                             "the stream too")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


# --- apply ----------------------------------------------------------------------------------------
@command("apply", help="apply update bitstreams to a model file, atomically",
         description="Apply updates made by 'nnc-edge update' to BASE, in the order given, and write the "
                     "result to OUT (which may be BASE itself). Each update's record is checked before it "
                     "is decoded: an update for another model, a missing or repeated update of a chain is "
                     "refused; after decoding, the result must match the record's digest. Nothing is "
                     "written unless every update applies: OUT is replaced atomically (temporary file, "
                     "fsync, rename) or left exactly as it was. The decoder state a chain needs for its "
                     "next update is kept beside OUT as OUT.<digest>.nncstate. Updates are decoded in slices; "
                     "from .safetensors to .safetensors the model is patched in a copy and the decoder "
                     "state rewritten slice by slice, so memory holds neither the model nor a whole "
                     "tensor.",
         examples=("nnc-edge apply --base model.safetensors update.nnc -o model.safetensors",
                   "nnc-edge apply --base m0.safetensors u1.nnc u2.nnc u3.nnc -o m3.safetensors"))
def run_apply(args, updates=None, before_replace=None):
    """``updates``: the bitstreams already read (and verified) by the caller, else args.updates are
    read; ``before_replace`` as for apply_update."""
    if args.chunk_size < 1:
        raise CommandError("--chunk-size must be positive", EXIT_INVALID)
    for path in [args.base] + (args.updates if updates is None else []):
        check_readable(path)  # what cannot be read is named as such, before anything is done
    try:
        model, state = apply_update(args.base, args.updates if updates is None else updates, args.output,
                                    allow_anonymous=args.allow_anonymous, chunk_size=args.chunk_size,
                                    return_state=True, before_replace=before_replace)
    except AnonymousUpdateError as exc:
        raise CommandError("%s; --allow-anonymous applies it anyway" % exc, EXIT_INVALID)
    except modelio.ModelFormatError as exc:
        raise CommandError(str(exc), EXIT_INVALID)
    except OSError as exc:
        where = exc.filename or args.output
        raise CommandError("cannot %s %s: %s" % ("read" if where == args.base != args.output else "write", where,
                                                 exc.strerror or exc))
    if not args.quiet:
        where = (", now at update %d of its chain" % state.sequence) if state.sequence else ""
        print("%s: %d update%s applied%s (model %s)"
              % (args.output, len(args.updates), "" if len(args.updates) == 1 else "s", where, state.model.hex()[:16]))
    return 0


@arguments("apply")
def _apply_arguments(parser):
    parser.add_argument("--base", required=True, metavar="BASE", help="the model file the updates apply to")
    parser.add_argument("updates", nargs="+", metavar="UPDATE", help="update bitstreams, applied in this order")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="the model file to write (.safetensors or .npz; may be BASE)")
    parser.add_argument("--allow-anonymous", action="store_true",
                        help="also apply updates without an update record (e.g. NNCodec's), unchecked")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                        help="bytes read per step while decoding (default %(default)d)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
