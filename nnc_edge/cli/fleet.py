"""``nnc-edge fleet``: what the devices of a model report; ``nnc-edge rollout``: widen (or resume) a
staged rollout and watch its devices; ``nnc-edge rollback``: make every device go back to an older
version (registered via cli.EXTENSIONS; ``publish --rollout`` takes its options from here too). The
reports are those of ``nnc-edge receive --id DEVICE`` and of nnc_device.agent; reading them is
transports/mqtt/fleet.py, the rollout and rollback logic transports/mqtt/rollout.py.
"""

import argparse
import asyncio
import json
import logging
import sys

from decoder_core import NNCError

from transports.chain_record import RecordError, default_state_dir

from . import EXIT_INVALID, CommandError, arguments, command
from .mqtt import _check_model_name, _positive_float, _positive_int, add_broker_arguments, broker_errors
from .mqtt import broker_settings, logged, make_publisher, publishing_errors


@command("fleet", help="show which version each device of a model runs (device reports over MQTT)",
         description="Read the retained reports of the devices of model NAME (nnc-edge receive --id DEVICE, "
                     "nnc_device.agent) and print one line per device: its id, version, state, the age of its "
                     "report and its last error, then how many devices are on each version and how many failed. "
                     "With --wait-for SEQ, wait until every device reports being current at version SEQ or later: "
                     "exit status 0 then, 1 after --timeout seconds, listing the devices that lag.",
         examples=("nnc-edge fleet --broker mqtt://localhost --model kws",
                   "nnc-edge fleet --broker mqtt://localhost --model kws --json",
                   "nnc-edge fleet --broker mqtt://localhost --model kws --wait-for 4 --timeout 600"))
@logged()
def run_fleet(args):
    from transports.mqtt import fleet
    _check_model_name(args.model)
    settings = broker_settings(args)
    with broker_errors(settings):
        if args.wait_for is None:
            view = asyncio.run(fleet.read_fleet(settings, args.prefix, args.model, quiet=args.quiet_period))
            reached = True
        else:
            reached, view = asyncio.run(fleet.wait_for(settings, args.prefix, args.model, args.wait_for,
                                                       args.timeout, quiet=args.quiet_period))
    if args.json:
        print(json.dumps(view.reports(), indent=1))
    else:
        print("\n".join(view.table()))
    if not reached:
        raise CommandError("model %s: after %g s, %s" % (args.model, args.timeout, _lag(view, args.wait_for)))
    return 0


def _lag(view, seq):
    from transports.mqtt.fleet import printable, version_label
    lagging = view.laggards(seq)
    if not lagging:
        return "no device reports on the model"
    return "%d device%s not current at version %d or later: %s" % (
        len(lagging), "" if len(lagging) == 1 else "s", seq,
        ", ".join("%s (%s, %s)" % (printable(r["id"]), version_label(r), r["state"]) for r in lagging))


def _version_number(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


@arguments("fleet")
def _fleet_arguments(parser):
    parser.add_argument("--model", required=True, metavar="NAME", help="the model's name (one topic level)")
    parser.add_argument("--json", action="store_true",
                        help="print the reports as a JSON list (id, seq, digest, state, target, error, time, "
                             "applied) instead of the table")
    parser.add_argument("--wait-for", type=_version_number, metavar="SEQ",
                        help="wait until every device reports being current at version SEQ or later")
    parser.add_argument("--timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                        help="with --wait-for: give up after this long, exit status 1 (default %(default)s)")
    parser.add_argument("--quiet-period", type=_positive_float, default=0.5, metavar="SECONDS",
                        help="the retained reports are taken as all there are after this long without one "
                             "(default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log MQTT details too")
    add_broker_arguments(parser)


# --- staged rollout -------------------------------------------------------------------------------
def _percent(text):
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("must be a percentage in 0 .. 100, not %s" % text)
    return int(value) if value.is_integer() else value


def _device_list(text):
    from transports.report import check_device_id
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("a comma-separated list of device ids, not %r" % text)
    for device in devices:
        try:
            check_device_id(device)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc))
    return devices


def add_wave_arguments(parser, publish=False):
    """The staged-rollout options of ``publish`` (``publish=True``) and ``rollout``."""
    group = parser.add_argument_group("staged rollout")
    if publish:
        group.add_argument("--rollout", type=_percent, metavar="PERCENT",
                           help="make the new version available to this share of devices only (0 .. 100; a "
                                "stable hash of each device id decides, so the same devices stay in the wave as "
                                "it widens); the others stay on their version and report 'waiting'")
        group.add_argument("--devices", type=_device_list, metavar="ID,...",
                           help="and/or to these devices (comma-separated ids)")
    else:
        group.add_argument("--percent", type=_percent, metavar="PERCENT",
                           help="widen the wave to this share of devices (not lower than it is; 100: every "
                                "device, and the wave is removed from the status unless --max-failures watches it)")
        group.add_argument("--devices", type=_device_list, metavar="ID,...",
                           help="the devices listed in the wave (comma-separated; every device listed now must "
                                "stay listed)")
        group.add_argument("--resume", action="store_true",
                           help="let a halted wave go on (it stays halted otherwise)")
    group.add_argument("--max-failures", type=_positive_int, metavar="N",
                       help="then watch the devices of the wave: exit 0 once every one that reports is current "
                            "at the new version; once N of them report failed or rolled-back for a version of "
                            "the wave, halt the wave (no device takes its versions any more), list them and "
                            "exit 1; exit 1 after --timeout")
    group.add_argument("--timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                       help="with --max-failures: stop watching after this long, exit status 1 and the devices "
                            "that lag (default %(default)s)")


def publish_wave(args):
    """The ``rollout`` argument of Publisher.publish for publish --rollout/--devices (None: keep the wave)."""
    if args.rollout is None and args.devices is None:
        if args.max_failures is not None:
            raise CommandError("--max-failures watches a staged rollout: give --rollout PERCENT or --devices",
                               EXIT_INVALID)
        return None
    wave = {}
    if args.rollout is not None:
        wave["percent"] = args.rollout
    if args.devices is not None:
        wave["devices"] = args.devices
    return wave


def _say(args, line):
    if not getattr(args, "quiet", False):
        sys.stderr.write("nnc-edge %s: %s\n" % (args.command.name, line))
        sys.stderr.flush()


def watch_wave(args, settings, record, status, started=False):
    """After a status with a wave was written: watch it with --max-failures (exit status), or just say
    what the wave is."""
    from transports.mqtt import rollout
    from transports.report import parse_rollout
    try:
        wave = parse_rollout(status.rollout)
    except NNCError:
        wave = None
    if wave is not None and wave.get("halted") and not started:
        sys.stderr.write("nnc-edge %s: warning: the status's staged rollout is halted (%s): version %d reaches no "
                         "device; let it go on with nnc-edge rollout --resume, start a new wave with --rollout, "
                         "or go back with nnc-edge rollback\n" % (args.command.name, rollout.describe_wave(wave),
                                                                 status.seq))
    if args.max_failures is None:
        return 0
    with broker_errors(settings):
        try:
            w = asyncio.run(rollout.watch(settings, args.prefix, args.model, status, args.max_failures,
                                          args.timeout, progress=lambda line: _say(args, line)))
            if w.outcome == rollout.Watch.FAILED:
                halted = asyncio.run(rollout.halt_wave(settings, args.prefix, args.model, record, w.first))
        except (rollout.RolloutError, RecordError) as exc:
            raise CommandError(str(exc))
    if w.outcome == rollout.Watch.DONE:
        members = len(w.members())
        if not getattr(args, "quiet", False):
            print("model %s: version %d: %s" % (
                args.model, status.seq, "%d device%s of the wave current" % (members, "" if members == 1 else "s")
                if members else "no device of the wave reports"))
        return 0
    if w.outcome == rollout.Watch.FAILED:
        for line in w.failures():
            sys.stderr.write("nnc-edge %s: failed: %s\n" % (args.command.name, line))
        raise CommandError("model %s: %d device%s of the wave failed (--max-failures %d): %s" % (
            args.model, len(w.failed), "" if len(w.failed) == 1 else "s", args.max_failures,
            "the rollout of versions %d and later is halted" % w.first if halted is not None else
            "the status names another wave by now, left as it is"))
    raise CommandError("model %s: after %g s, %d device%s of the wave not current at version %d or later: %s"
                       % (args.model, args.timeout, len(w.laggards()), "" if len(w.laggards()) == 1 else "s",
                          status.seq, w.describe_laggards()))


@command("rollout", help="widen (or resume) the staged rollout of a model's newest versions",
         description="Change the staged-rollout wave in the retained status of model NAME (nnc-edge publish "
                     "--rollout started it): --percent and --devices widen it (it never narrows: every device "
                     "that took a version of the wave stays in it), --resume lets a halted wave go on. The "
                     "status is read and written again under this host's record lock (--state-dir), so a "
                     "publisher on this host does not write it at the same time. With --max-failures N the "
                     "devices of the wave are then watched: exit status 0 once every one that reports is "
                     "current at the newest version, 1 when N of them report failed or rolled-back (the wave is "
                     "halted: no device takes its versions any more), 1 after --timeout. Exit status 2 when the "
                     "wave cannot be changed so (no wave, a narrower one), 1 when the broker cannot be reached "
                     "or a publisher of this host holds the record for over a minute.",
         examples=("nnc-edge rollout --broker mqtt://localhost --model kws --percent 50",
                   "nnc-edge rollout --broker mqtt://localhost --model kws --percent 100 --max-failures 3 "
                   "--timeout 1800",
                   "nnc-edge rollout --broker mqtt://localhost --model kws --devices pi-1,pi-2,pi-7",
                   "nnc-edge rollout --broker mqtt://localhost --model kws --resume"))
@logged(quiet_level=logging.ERROR)
def run_rollout(args):
    from transports.chain_record import ChainRecord
    from transports.mqtt import rollout
    _check_model_name(args.model)
    if args.percent is None and args.devices is None and not args.resume:
        raise CommandError("give --percent, --devices or --resume", EXIT_INVALID)
    settings = broker_settings(args)
    record = ChainRecord(args.state_dir, args.prefix, args.model)
    with publishing_errors(settings, "model %s" % args.model, args.state_dir):
        try:
            old, status, notes = asyncio.run(rollout.change_wave(settings, args.prefix, args.model, record,
                                                                 args.percent, args.devices, args.resume,
                                                                 keep=args.max_failures is not None))
        except rollout.RolloutError as exc:
            raise CommandError("model %s: %s" % (args.model, exc), EXIT_INVALID)
        except RecordError as exc:
            raise CommandError(str(exc))
    if not args.quiet:
        print("model %s: %s (was %s)" % (args.model, rollout.describe_wave(status.rollout),
                                         rollout.describe_wave(old)))
        for note in notes:
            print("  " + note)
    return watch_wave(args, settings, record, status, started=True)


@arguments("rollout")
def _rollout_arguments(parser):
    parser.add_argument("--model", required=True, metavar="NAME", help="the model's name (one topic level)")
    parser.add_argument("--state-dir", default=default_state_dir(), metavar="DIR",
                        help="this host's record of the model (nnc-edge publish --state-dir), locked while the "
                             "status is rewritten (default %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log MQTT details too")
    add_wave_arguments(parser)
    add_broker_arguments(parser)


# --- rollback -------------------------------------------------------------------------------------
@command("rollback", help="make every device go back to an older version of a model",
         description="Publish version SEQ of model NAME again, as the next version N + 1 (version numbers only "
                     "rise): a full model whose envelope names SEQ as the version it restores. Devices that "
                     "still hold version SEQ switch to it without downloading; the others download it. SEQ must "
                     "be on the chain this host's record keeps (--state-dir: the last full model and the updates "
                     "after it) and older than the current version. Its bitstream is SEQ's own when SEQ is a full "
                     "model; otherwise the chain is decoded up to SEQ and coded again as a full model that "
                     "decodes to exactly SEQ's model (checked by its model digest; float tensors coding would "
                     "change are sent as float32 values). The chain starts again at N + 1, and the status names "
                     "no staged rollout: a rollback is for every device. Exit status 2 when SEQ cannot be "
                     "restored, 1 when the broker cannot be reached.",
         examples=("nnc-edge rollback --broker mqtt://localhost --model kws --to 6",
                   "nnc-edge rollback --broker mqtt://localhost --model kws --to 6 --signing-key publisher.key "
                   "--max-message-bytes 4096"))
@logged()
def run_rollback(args):
    from transports.mqtt import rollout
    _check_model_name(args.model)
    settings = broker_settings(args)
    _, publisher = make_publisher(args, settings)
    with publishing_errors(settings, "model %s: version %d" % (args.model, args.to), args.state_dir):
        try:
            status = asyncio.run(rollout.rollback(publisher, args.to))
        except rollout.RolloutError as exc:
            raise CommandError("model %s: %s" % (args.model, exc), EXIT_INVALID)
    if not args.quiet:
        count = status.counts[-1]
        print("model %s: version %d restores version %d (a full model in %d message%s); devices that hold version %d "
              "switch to it without downloading" % (args.model, status.seq, args.to, count, "" if count == 1 else "s",
                                                     args.to))
    return 0


@arguments("rollback")
def _rollback_arguments(parser):
    parser.add_argument("--model", required=True, metavar="NAME", help="the model's name (one topic level)")
    parser.add_argument("--to", required=True, type=_version_number, metavar="SEQ",
                        help="the version to go back to (on the chain this host's record keeps)")
    parser.add_argument("--state-dir", default=default_state_dir(), metavar="DIR",
                        help="this host's record of the model's chain (nnc-edge publish --state-dir; default "
                             "%(default)s)")
    parser.add_argument("--signing-key", metavar="KEY",
                        help="sign the publication with this private key (nnc-edge keygen), as publish does")
    parser.add_argument("--max-message-bytes", type=_positive_int, default=64 << 10, metavar="BYTES",
                        help="largest MQTT payload (default %(default)d; 4096 or less for microcontroller clients)")
    parser.add_argument("--retries", type=int, default=5, metavar="N",
                        help="reconnect attempts after a lost connection (default %(default)d)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("-v", "--verbose", action="store_true", help="log MQTT details too")
    add_broker_arguments(parser)
