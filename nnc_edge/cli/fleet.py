"""``nnc-edge fleet``: what the devices of a model report (registered via cli.EXTENSIONS). The reports
are those of ``nnc-edge receive --id DEVICE`` and of nnc_device.agent; reading them is
transports/mqtt/fleet.py.
"""

import asyncio
import json

from . import CommandError, arguments, command
from .mqtt import _check_model_name, _connection_error, _positive_float, add_broker_arguments, broker_settings
from .mqtt import logging_to_stderr


@command("fleet", help="show which version each device of a model runs (device reports over MQTT)",
         description="Read the retained reports of the devices of model NAME (nnc-edge receive --id DEVICE, "
                     "nnc_device.agent) and print one line per device: its id, version, state, the age of its "
                     "report and its last error, then how many devices are on each version and how many failed. "
                     "With --wait-for SEQ, wait until every device reports being current at version SEQ or later: "
                     "exit status 0 then, 1 after --timeout seconds, listing the devices that lag.",
         examples=("nnc-edge fleet --broker mqtt://localhost --model kws",
                   "nnc-edge fleet --broker mqtt://localhost --model kws --json",
                   "nnc-edge fleet --broker mqtt://localhost --model kws --wait-for 4 --timeout 600"))
def run_fleet(args):
    with logging_to_stderr(args):
        return _fleet(args)


def _fleet(args):
    from transports import mqtt
    from transports.mqtt import fleet
    _check_model_name(args.model)
    settings = broker_settings(args)
    try:
        if args.wait_for is None:
            view = asyncio.run(fleet.read_fleet(settings, args.prefix, args.model, quiet=args.quiet_period))
            reached = True
        else:
            reached, view = asyncio.run(fleet.wait_for(settings, args.prefix, args.model, args.wait_for,
                                                       args.timeout, quiet=args.quiet_period))
    except Exception as exc:  # aiomqtt.MqttError: a broker we cannot reach or that refuses us
        if mqtt.is_mqtt_error(exc):
            raise _connection_error(settings, exc)
        raise
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
