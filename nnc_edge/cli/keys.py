"""``nnc-edge keygen``, ``sign`` and ``verify``, and ``apply --trusted-key`` (registered via cli.EXTENSIONS).

Ed25519 signatures for bitstreams (nnc_edge.signing): the publisher makes a key pair once, signs each
update, and ships the detached ``UPDATE.sig`` with it; a device given ``--trusted-key`` applies only
updates whose signature checks out, and only in increasing sequence order.
"""

import io
import os
import sys

from decoder_core import NNCError

from . import EXIT_INVALID, CommandError, alternative, arguments, command, read_input


def _signing():
    from .. import signing
    return signing


def load_trusted(paths):
    """TrustedKeys from --trusted-key files (CommandError when one cannot be read)."""
    signing = _signing()
    try:
        return signing.TrustedKeys.load(paths)
    except OSError as exc:
        raise CommandError("cannot read trusted key: %s" % exc)
    except NNCError as exc:
        raise CommandError(str(exc), EXIT_INVALID)


def load_signing_key(path):
    signing = _signing()
    try:
        return signing.SigningKey.load(path)
    except OSError as exc:
        raise CommandError("cannot read signing key %s: %s" % (path, exc.strerror or exc))
    except NNCError as exc:
        raise CommandError(str(exc), EXIT_INVALID)


# --- keygen ---------------------------------------------------------------------------------------
@command("keygen", help="make an Ed25519 key pair for signing bitstreams",
         description="Write a new Ed25519 private key to KEY (PEM PKCS#8, file mode 0600) and its public key to "
                     "KEY.pub (PEM). Keep KEY on the publishing host; install KEY.pub on the devices "
                     "(--trusted-key). An existing KEY is not overwritten unless --force is given.",
         examples=("nnc-edge keygen -o publisher.key",))
def run_keygen(args):
    signing = _signing()
    key = signing.SigningKey.generate()
    try:
        key.save(args.output, overwrite=args.force)
    except FileExistsError:
        raise CommandError("%s exists: use --force to replace it" % args.output)
    except OSError as exc:
        raise CommandError("cannot write %s: %s" % (args.output, exc.strerror or exc))
    if not args.quiet:
        print("%s (private, mode 0600) and %s.pub: key %s" % (args.output, args.output, signing._hex(key.key_id)))
    return 0


@arguments("keygen")
def _keygen_arguments(parser):
    parser.add_argument("-o", "--output", required=True, metavar="KEY", help="private key file to write (KEY.pub too)")
    parser.add_argument("--force", action="store_true", help="replace existing key files")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


# --- sign -----------------------------------------------------------------------------------------
@command("sign", help="sign a bitstream (detached Ed25519 signature)",
         description="Sign BITSTREAM with the private key KEY and write the detached signature to BITSTREAM.sig "
                     "(or -o). The signature covers the model name, the sequence number, the parent digest "
                     "and the SHA-256 of the bitstream. For an update made by 'nnc-edge update' the sequence "
                     "and parent default to its update record; otherwise --sequence is needed (the parent of a "
                     "full model is all zeros). Devices accept only sequence numbers above the last one they "
                     "applied for the model.",
         examples=("nnc-edge sign update.nnc --key publisher.key --model kws",
                   "nnc-edge sign model.nnc --key publisher.key --model kws --sequence 1"))
def run_sign(args):
    signing = _signing()
    data = read_input(args.input)
    key = load_signing_key(args.key)
    sequence, parent = args.sequence, None
    if args.parent is not None:
        try:
            parent = bytes.fromhex(args.parent)
        except ValueError:
            parent = b""
        if len(parent) != 32:
            raise CommandError("--parent must be 64 hex digits", EXIT_INVALID)
    info = _update_info(args.input, data)
    if info is not None:
        if sequence is None:
            sequence = info.sequence
        if parent is None:
            parent = info.parent
    if sequence is None:
        raise CommandError("%s carries no update record: give --sequence" % args.input, EXIT_INVALID)
    try:
        sig = signing.sign_bitstream(data, key, sequence, args.model,
                                     parent if parent is not None else signing.NO_DIGEST)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_INVALID)
    out = args.output or signing.signature_path(args.input)
    try:
        sig.save(out)
    except OSError as exc:
        raise CommandError("cannot write %s: %s" % (out, exc.strerror or exc))
    if not args.quiet:
        print("%s: signed %s (key %s) -> %s" % (args.input, sig.describe(), signing._hex(sig.key_id), out))
    return 0


def _update_info(path, data):
    from ..updates import read_update_info
    try:
        return read_update_info(data)
    except NNCError as exc:
        raise CommandError("%s: %s" % (path, exc), EXIT_INVALID)


@arguments("sign")
def _sign_arguments(parser):
    parser.add_argument("input", metavar="BITSTREAM", help="the bitstream (.nnc) to sign")
    parser.add_argument("--key", required=True, metavar="KEY", help="the private key (from nnc-edge keygen)")
    parser.add_argument("--model", required=True, metavar="NAME", help="the name of the model the bitstream is for")
    parser.add_argument("--sequence", type=int, metavar="N",
                        help="sequence number (default: the update record's)")
    parser.add_argument("--parent", metavar="HEX",
                        help="digest of what the bitstream applies to (default: the update record's parent; "
                             "zeros for a full model)")
    parser.add_argument("-o", "--output", metavar="SIG", help="signature file to write (default BITSTREAM.sig)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


# --- verify ---------------------------------------------------------------------------------------
def verify_file(path, data, trusted, model=None, signature=None):
    """Check the bitstream read from ``path`` against its detached signature (``signature`` or
    PATH.sig) and, for an update, against its record; returns the Signature (SignatureError else)."""
    signing = _signing()
    sig = signing.Signature.load(signature or signing.signature_path(path))
    info = _update_info(path, data)
    return signing.verify_bitstream(data, sig, trusted, model=model,
                                    sequence=info.sequence if info is not None else None,
                                    parent=info.parent if info is not None else None)


@command("verify", help="check a bitstream's detached signature",
         description="Check that BITSTREAM.sig (or --signature) is a valid signature of BITSTREAM by one of the "
                     "trusted public keys, and that it names the model (--model) and the sequence and parent "
                     "of the update record. Exit status 0 when it does, 2 when it does not.",
         examples=("nnc-edge verify update.nnc --trusted-key publisher.key.pub --model kws",))
def run_verify(args):
    trusted = load_trusted(args.trusted_key)
    for path in args.inputs:
        data = read_input(path)
        try:
            sig = verify_file(path, data, trusted, args.model, args.signature)
        except NNCError as exc:
            raise CommandError("%s: %s" % (path, exc), EXIT_INVALID)
        except OSError as exc:
            raise CommandError("cannot read the signature of %s: %s" % (path, exc.strerror or exc))
        if not args.quiet:
            print("%s: good signature, %s, key %s" % (path, sig.describe(), _signing()._hex(sig.key_id)))
    return 0


@arguments("verify")
def _verify_arguments(parser):
    parser.add_argument("inputs", nargs="+", metavar="BITSTREAM", help="bitstreams with a .sig beside them")
    parser.add_argument("--trusted-key", required=True, action="append", metavar="PUB",
                        help="a trusted public key (repeat for several)")
    parser.add_argument("--model", metavar="NAME", help="the model the bitstreams must be signed for")
    parser.add_argument("--signature", metavar="SIG", help="the signature file (default BITSTREAM.sig; one input only)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


# --- apply --trusted-key --------------------------------------------------------------------------
@arguments("apply")
def _apply_signature_arguments(parser):
    group = parser.add_argument_group("signed updates")
    group.add_argument("--trusted-key", action="append", metavar="PUB",
                       help="apply only updates with a valid UPDATE.sig by this public key (repeat for several); "
                            "all of them are checked before anything is applied")
    group.add_argument("--model", metavar="NAME", help="with --trusted-key: the model name the updates must be "
                                                       "signed for (required)")
    group.add_argument("--sequence-file", metavar="FILE",
                       help="with --trusted-key: where the last applied sequence number per model is kept "
                            "(default: nnc-edge-sequences.json beside OUT); older or repeated sequence numbers "
                            "are refused")


@alternative("apply", "trusted_key")
def run_apply_signed(args):
    """Verify every update, then apply them with the sequence record written first: an exit status
    other than 0 means the model is as it was, and a kill at any point leaves a record that the
    next run reads right (see signing.SequenceStore)."""
    from .update import run_apply
    signing = _signing()
    if not args.model:
        raise CommandError("--trusted-key needs --model NAME", EXIT_INVALID)
    trusted = load_trusted(args.trusted_key)
    store = signing.SequenceStore(args.sequence_file or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                                                     "nnc-edge-sequences.json"))
    try:
        interrupted = store.settle(args.model)
        if interrupted is not None:
            from ..updates import remove_stale_states
            remove_stale_states(*interrupted)  # what an apply killed after replacing the model left
        last = store.last(args.model)
    except NNCError as exc:
        raise CommandError(str(exc), EXIT_INVALID)
    except OSError as exc:  # reading the record, settling it, or hashing the model it names
        raise CommandError("cannot use %s: %s" % (exc.filename or store.path, exc.strerror or exc))
    verified = []
    try:
        for path in args.updates:
            data = read_input(path)
            sig = verify_file(path, data, trusted, args.model)
            signing.check_newer(sig, last)
            last = sig.sequence
            # Exactly the bytes that were verified are applied (the file is not read again), under
            # the file's name.
            update = io.BytesIO(data)
            update.name = path
            verified.append(update)
    except NNCError as exc:
        raise CommandError("%s: %s" % (path, exc), EXIT_INVALID)
    except OSError as exc:
        raise CommandError("cannot read the signature of %s: %s" % (path, exc.strerror or exc))
    status = run_apply(args, verified, lambda state: store.begin(args.model, last, args.output, state.model))
    try:
        store.record(args.model, last)
    except OSError as exc:
        # The pending record already counts the update; settling it only spares the next run a hash.
        sys.stderr.write("nnc-edge apply: warning: cannot write %s: %s\n" % (store.path, exc.strerror or exc))
    return status


# --- publish --signing-key / receive --trusted-key ------------------------------------------------
@arguments("publish")
def _publish_signature_arguments(parser):
    parser.add_argument("--signing-key", metavar="KEY",
                        help="sign the publication with this private key (nnc-edge keygen): the signature travels "
                             "in every message's envelope, over the model name, version, parent and SHA-256")


def publisher_signing(args):
    """The keyword arguments of transports.mqtt.Publisher for --signing-key (none without it)."""
    path = getattr(args, "signing_key", None)
    if path is None:
        return {}
    signing = _signing()
    return {"sign": signing.envelope_signer(load_signing_key(path)), "ext_bytes": signing.EXT_BYTES}


@arguments("receive")
def _receive_signature_arguments(parser):
    parser.add_argument("--trusted-key", action="append", metavar="PUB",
                        help="accept only publications signed by this public key (repeat for several), each checked "
                             "on its first message before anything is decoded, and only versions newer than the "
                             "device's")


def receiver_verifier(args, store):
    """The ``verify`` hook of transports.mqtt.Receiver for --trusted-key (None without it)."""
    paths = getattr(args, "trusted_key", None)
    if not paths:
        return None
    return _signing().envelope_verifier(load_trusted(paths),
                                        lambda: store.version[0] if store.version is not None else None)
