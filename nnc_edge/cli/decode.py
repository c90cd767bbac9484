"""``nnc-edge inspect`` and ``nnc-edge decode``: NNR units listed, bitstreams decoded to model files
(``decode --stream`` is in cli/stream.py)."""

import json
import os
import sys

from decoder_core import NNCError
from decoder_core.tables import NNR_AGG, NNR_NDU, PAYLOAD_TYPE_NAMES
from decoder_core.units import ParserState, parse_units

from .. import modelio
from ..decoding import Decoder, empty_bitstream
from . import EXIT_INVALID, CommandError, arguments, command, invalid, read_input, read_model


def iter_units(data):
    """Parse every NNR unit without decoding payloads: yields (depth, unit, profile) in stream
    order, the units inside an aggregate unit right after it with depth + 1."""
    state = ParserState()
    for unit in parse_units(data, state):
        for depth, member in _nested(unit, 0):
            yield depth, member, member.get("general_profile_idc", state.general_profile_idc)


def _nested(unit, depth):
    yield depth, unit
    for member in unit.get("units", ()):
        for item in _nested(member, depth + 1):
            yield item


_COLUMNS = "%8s %8s  %-16s %7s  %-16s %2s %4s %5s %4s  %s"
_HEADER = _COLUMNS % ("offset", "size", "type", "profile", "payload", "dq", "scan", "entry", "part", "tensor")


def unit_line(depth, unit, profile, record=None):
    """One line of ``nnc-edge inspect`` for a unit (nested units indented by their depth); ``record``:
    the nnc-edge update record it carries (an nnc_edge.updates.UpdateInfo), if any."""
    payload = dq = scan = entries = "-"
    what = ""
    if record is not None:
        what = "update %d: parent %s, result %s, root %s, flags 0x%02x%s" % (
            record.sequence, record.parent.hex()[:16], record.result.hex()[:16], record.root.hex()[:16],
            record.flags, " (continues_state)" if record.continues_state else "")
    if unit.nnr_unit_type == NNR_NDU:
        ndu = unit.ndu
        payload = PAYLOAD_TYPE_NAMES[ndu.nnr_compressed_data_unit_payload_type]
        dq, scan = ndu.dq_flag, ndu.scan_order
        entries = len(ndu.get("cabac_offset_list", ()))
        shape = ndu.get("TensorDimensions")
        what = "%s %s" % (",".join(unit.names), list(shape) if shape is not None else "[?]")
    elif unit.nnr_unit_type == NNR_AGG:
        entries = len(unit.agg.nnr_unit_entry_point)
        what = "%d units" % len(unit.units)
    return _COLUMNS % (unit.offset, unit.nnr_unit_size, "  " * depth + unit.type_name,
                       "-" if profile is None else profile, payload, dq, scan, entries,
                       unit.partial_data_counter, what)


def update_record(unit, data):
    """The nnc-edge update record (nnc_edge.updates.unit_record) a unit of ``data`` carries, or None.
    Other applications may use the unit type too: what is not a valid record is listed as it is."""
    from ..updates import unit_record

    try:
        return unit_record(unit, data)
    except NNCError:
        return None


def _record_fields(record):
    return {"sequence": record.sequence, "parent": record.parent.hex(), "result": record.result.hex(),
            "root": record.root.hex(), "flags": record.flags, "continues_state": record.continues_state}


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    return repr(value)


@command("inspect", help="list the NNR units of a bitstream",
         description="List the NNR units of a bitstream, one line each: byte offset, size, unit type, "
                     "profile (general_profile_idc), payload type, dq_flag, scan_order, number of entry "
                     "points, partial_data_counter, and tensor name(s) with shape. Units inside an "
                     "aggregate unit are indented. Payloads are parsed, not decoded.",
         examples=("nnc-edge inspect model.nnc", "nnc-edge inspect --json model.nnc > units.json"))
def run_inspect(args):
    data = read_input(args.file)
    try:
        if args.json:
            # Top-level units, each the syntax tree decoder_core parsed (aggregate members under "units").
            units = []
            for depth, unit, _ in iter_units(data):
                if depth == 0:
                    units.append(unit.as_dict())
                    record = update_record(unit, data)
                    if record is not None:
                        units[-1]["update_record"] = _record_fields(record)
            json.dump(units, sys.stdout, indent=1, default=_json_default)
            sys.stdout.write("\n")
            return 0
        print(_HEADER)
        for depth, unit, profile in iter_units(data):
            print(unit_line(depth, unit, profile, update_record(unit, data)).rstrip())
    except NNCError as exc:
        raise invalid(args.file, exc)
    return 0


@arguments("inspect")
def _inspect_arguments(parser):
    parser.add_argument("file", help="an NNR bitstream (.nnc)")
    parser.add_argument("--json", action="store_true",
                        help="print the parsed syntax of every unit as a JSON list (nested units under \"units\")")


# --- decode ---------------------------------------------------------------------------------------
def output_paths(inputs, output, fmt):
    """Where each input's tensors go: output itself for one input naming a file, else one file per
    input, named after it, in the directory output, which is made here. What can be checked before
    anything is decoded is: an empty input (an empty bitstream, what a failed download leaves) is
    refused, and so is an output directory that cannot be made."""
    for path in inputs:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise invalid(path, empty_bitstream())
    if len(inputs) == 1 and not os.path.isdir(output) and not output.endswith(("/", os.sep)):
        try:
            suffix_fmt = modelio.format_of(output)
        except modelio.ModelFormatError as exc:
            raise CommandError(str(exc), EXIT_INVALID)
        if fmt is not None and fmt != suffix_fmt:
            raise CommandError("--format %s contradicts the output suffix of %s" % (fmt, output), EXIT_INVALID)
        return [output]
    paths = [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + "." + (fmt or "safetensors"))
             for p in inputs]
    if len(set(paths)) != len(paths):
        raise CommandError("inputs with the same file name would overwrite each other's output in %s" % output,
                           EXIT_INVALID)
    if os.path.isfile(output):
        raise CommandError("-o %s is a file: several inputs are decoded into a directory" % output, EXIT_INVALID)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as exc:
        raise CommandError("cannot create the directory %s: %s" % (output, exc.strerror or exc))
    return paths


def topology_of(path):
    """The out-of-band topology (nnc_edge.updates.update_topology) of the model file ``path``, or None."""
    if path is None:
        return None
    from ..updates import update_topology

    return update_topology(read_model(path, modelio.tensor_shapes))


@command("decode", help="decode bitstreams to .safetensors or .npz",
         description="Decode NNR bitstreams to tensors and write them to .safetensors or .npz (chosen by "
                     "the output suffix). Several inputs decode in the order given as one chain, with "
                     "one decoder state (incremental updates: each step decodes against what the "
                     "previous ones left); each writes its own output, named after it, into the "
                     "directory -o.",
         examples=("nnc-edge decode model.nnc -o model.safetensors",
                   "nnc-edge decode model.nnc -o model.npz",
                   "nnc-edge decode big.nnc -o big.safetensors --stream   # memory independent of the model",
                   "nnc-edge decode base.nnc update1.nnc update2.nnc -o decoded/ --format npz",
                   "nnc-edge decode u1.nnc --topology base.safetensors -o u1_difference.safetensors"))
def run_decode(args):
    if args.output is None:
        raise CommandError("-o/--output is required", EXIT_INVALID)
    outputs = output_paths(args.inputs, args.output, args.format)
    decoder = Decoder(topology_of(args.topology))
    for path, out in zip(args.inputs, outputs):
        data = read_input(path)
        try:
            tensors = decoder.decode(data)
        except NNCError as exc:
            raise invalid(path, exc)
        try:
            modelio.save(out, tensors)
        except OSError as exc:
            raise CommandError("cannot write %s: %s" % (out, exc.strerror or exc))
        if not args.quiet:
            print("%s -> %s: %d tensor%s, %d parameters" % (path, out, len(tensors), "" if len(tensors) == 1 else "s",
                                                             sum(t.size for t in tensors.values())))
    return 0


@arguments("decode")
def _decode_arguments(parser):
    parser.add_argument("inputs", nargs="+", metavar="IN", help="NNR bitstreams (.nnc), decoded in this order")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="output file (.safetensors or .npz) for one input, or a directory (created if "
                             "needed) for several")
    parser.add_argument("--format", choices=("safetensors", "npz"),
                        help="file format of the outputs written into a directory (default: safetensors)")
    parser.add_argument("--topology", metavar="MODEL",
                        help="a model file (.safetensors or .npz) that gives the out-of-band topology: an update "
                             "written by 'nnc-edge update' names its tensors by their index in the model it "
                             "applies to, so decode it with --topology BASE to get the names")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print a line per output")
