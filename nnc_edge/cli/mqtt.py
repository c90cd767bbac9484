"""``nnc-edge publish``, ``nnc-edge receive`` and ``nnc-edge demo``: MQTT delivery (registered via
cli.EXTENSIONS). The protocol is described in transports/mqtt/; the demo is nnc_edge/cli/demo.py.

Connection options are named as mosquitto_pub/mosquitto_sub name them: --username/-u,
--password/-P (or --password-file, or the environment variable NNC_EDGE_MQTT_PASSWORD, which keep it
out of the process list), --cafile, --cert, --key, --insecure, --id (for receive: the device id,
which also makes its client id), --keepalive.

``nnc-edge receive --config FILE`` reads the same options from a TOML file (the device service,
deploy/nnc-edge-receive@.service): each key is a long option's name, options on the command line win.
"""

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys

from decoder_core import NNCError

from transports.chain_record import default_state_dir

from .. import modelio
from . import EXIT_INVALID, EXIT_IO, CommandError, arguments, command, read_input, read_model

PASSWORD_ENV = "NNC_EDGE_MQTT_PASSWORD"


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, not %s" % text)
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive, not %s" % text)
    return value


def _percent_or_off(text):
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("a percentage of 0 or more (0: off), not %s" % text)
    return value


def add_broker_arguments(parser, required=True, device=False):
    group = parser.add_argument_group("broker connection (as mosquitto_pub/mosquitto_sub name them)")
    group.add_argument("--broker", required=required, metavar="URL",
                       help="mqtt://HOST[:PORT] (default port 1883) or mqtts://HOST[:PORT] (TLS, default 8883)"
                            + ("" if required else "; without it an embedded broker is started"))
    group.add_argument("-u", "--username", help="user name for the broker")
    group.add_argument("-P", "--password",
                       help="password for the broker (default: $%s)" % PASSWORD_ENV)
    group.add_argument("--password-file", metavar="FILE",
                       help="read the broker's password from the first line of FILE (an empty file: none)")
    group.add_argument("--cafile", help="CA certificates (PEM) to verify the broker with; implies TLS")
    group.add_argument("--cert", help="client certificate (PEM) for brokers that require one")
    group.add_argument("--key", help="the client certificate's private key (PEM)")
    group.add_argument("--insecure", action="store_true",
                       help="with TLS, do not check that the broker's certificate names its host")
    if device:
        # A device's client id is made from its id (transports.report), so one option names both.
        group.add_argument("--id", dest="device_id", metavar="DEVICE",
                           help="the device's id: it reports to PREFIX/MODEL/devices/DEVICE and connects as "
                                "client nnc-edge-DEVICE (default: no reports, a random client id)")
    else:
        group.add_argument("--id", dest="client_id", help="MQTT client id (default: a random one)")
    group.add_argument("--keepalive", type=_positive_int, default=30, metavar="SECONDS",
                       help="MQTT keepalive interval (default %(default)s)")
    group.add_argument("--prefix", default="nnc",
                       help="topic prefix: topics are PREFIX/MODEL/... (default %(default)s)")


def broker_settings(args, url=None):
    from transports.mqtt import BrokerSettings
    password = args.password
    if args.password_file is not None:
        if password is not None:
            raise CommandError("give --password or --password-file, not both", EXIT_INVALID)
        password = _read_password(args.password_file)
    elif password is None:
        password = os.environ.get(PASSWORD_ENV)
    try:
        return BrokerSettings(url or args.broker, username=args.username, password=password, cafile=args.cafile,
                              cert=args.cert, key=args.key, insecure=args.insecure,
                              client_id=getattr(args, "client_id", None),
                              keepalive=args.keepalive)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_INVALID)


def _read_password(path):
    # An empty file stands for no password: what systemd hands the service when the unit's password
    # credential has no file behind it.
    try:
        with open(path, "r", encoding="utf-8") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError("cannot read the password file %s: %s" % (path, getattr(exc, "strerror", None) or exc))
    return line.rstrip("\r\n") or None


@contextlib.contextmanager
def logging_to_stderr(args, quiet_level=logging.WARNING):
    """Log nnc_edge's messages on stderr for the command's duration (-q: problems only, -v: all,
    including paho-mqtt's own); the previous logging setup is restored afterwards."""
    level = quiet_level if getattr(args, "quiet", False) else logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("nnc_edge")
    paho = logging.getLogger("nnc_edge.mqtt.paho")
    saved = logger.handlers[:], logger.level, logger.propagate, paho.level
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # paho-mqtt's socket errors repeat what our own warnings say.
    paho.setLevel(logging.DEBUG if level == logging.DEBUG else logging.CRITICAL)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
        paho.setLevel(saved[3])


def logged(quiet_level=logging.WARNING):
    """Decorator: the command handler run(args) runs with logging_to_stderr(args, quiet_level)."""
    def wrap(run):
        @functools.wraps(run)
        def run_logged(args):
            with logging_to_stderr(args, quiet_level):
                return run(args)
        return run_logged
    return wrap


def _check_model_name(model):
    from transports.envelope import check_model_name
    try:
        check_model_name(model)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_INVALID)


def _connection_error(settings, exc):
    return CommandError("broker %r: %s" % (settings, exc), EXIT_IO)


# --- publish --------------------------------------------------------------------------------------
@command("publish", help="publish a model or an update to devices over MQTT",
         description="Publish an NNR bitstream as the next version of model NAME: as retained QoS 1 messages "
                     "of at most --max-message-bytes, each carrying whole NNR units (large tensors are re-cut "
                     "into partial-data units), then the retained status PREFIX/NAME/status announcing the new "
                     "version. A bitstream with an update record (nnc-edge update) is published as an update "
                     "of the current version, any other as a full model (--kind overrides). A .safetensors or "
                     ".npz model is encoded first. Lost connections are retried with backoff. This host's "
                     "record of the chain (--state-dir) keeps version numbers from going backwards, refuses an "
                     "update that does not continue the chain (published already, or made from another model), "
                     "and publishes the chain again when the broker has lost it. --rollout PERCENT and/or "
                     "--devices ID,... make the new version a staged rollout: only the devices in that wave "
                     "take it (a stable hash of the device id picks the share), the others stay on their "
                     "version and report 'waiting'; widen it with nnc-edge rollout. Without them a wave the "
                     "status has goes on as it is. With --max-failures N the command then watches the devices "
                     "of the wave: exit status 0 once every one that reports is current at the new version, 1 "
                     "when N of them report failed or rolled-back (the wave is then halted) or after --timeout. "
                     "Chain compaction: when the updates since the last full model add up to more than "
                     "--compact-at percent of it (default 50), the current model is published again as the next "
                     "version, a full model (as nnc-edge rollback makes it), if that is the smaller download for "
                     "a device that joins later and no staged rollout is in progress; devices that are current "
                     "switch to it without downloading. Updates that continue the old chain's decoder state are "
                     "refused after it: the next update starts a new chain (--residual STATE restarts the state "
                     "file of nnc-edge update --residual).",
         examples=("nnc-edge publish model.nnc --broker mqtt://localhost --model kws",
                   "nnc-edge publish update.nnc --broker mqtts://broker.example:8883 --cafile ca.crt -u host "
                   "--model kws",
                   "nnc-edge publish model.nnc --broker mqtt://localhost --model kws --max-message-bytes 4096",
                   "nnc-edge publish update.nnc --broker mqtt://localhost --model kws --rollout 10 --max-failures 2",
                   "nnc-edge publish update.nnc --broker mqtt://localhost --model kws --devices pi-1,pi-2",
                   "nnc-edge publish u7.nnc --broker mqtt://localhost --model kws --compact-at 50 "
                   "--residual chain.state"))
@logged()
def run_publish(args):
    from transports.envelope import FULL, UPDATE
    _check_model_name(args.model)
    settings = broker_settings(args)
    from .fleet import publish_wave, watch_wave
    wave = publish_wave(args)
    data, kind = _publication(args.input, args.kind)
    record, publisher = make_publisher(args, settings)
    with publishing_errors(settings, args.input, args.state_dir):
        status = asyncio.run(publisher.publish(data, UPDATE if kind == "update" else FULL, seq=args.seq,
                                               rollout=wave))
    compaction = publisher.compaction
    if not args.quiet:
        published = status if compaction is None else compaction.update
        count = published.counts[-1]
        print("%s -> %r %s/%s: %s %d, %d bytes in %d message%s" % (
            args.input, settings, args.prefix, args.model, kind, published.seq, len(data), count,
            "" if count == 1 else "s"))
        if compaction is not None:
            print("model %s: %s" % (args.model, compaction.describe()))
    return watch_wave(args, settings, record, status, started=wave is not None)


def make_publisher(args, settings):
    """(this host's ChainRecord, the Publisher) for the options publish and rollback share: --state-dir,
    --max-message-bytes, --retries, --signing-key."""
    from transports import mqtt
    from transports.chain_record import ChainRecord
    from .keys import publisher_signing
    if args.max_message_bytes < mqtt.MIN_MESSAGE_BYTES:
        raise CommandError("--max-message-bytes must be at least %d" % mqtt.MIN_MESSAGE_BYTES, EXIT_INVALID)
    record = ChainRecord(args.state_dir, args.prefix, args.model)
    compact_at = getattr(args, "compact_at", 0)  # publish's; rollback never compacts
    return record, mqtt.Publisher(settings, args.model, prefix=args.prefix, max_message_bytes=args.max_message_bytes,
                                  retries=args.retries, record=record,
                                  compact_at=compact_at / 100 if compact_at else None,
                                  chain_state=getattr(args, "residual", None), **publisher_signing(args))


@contextlib.contextmanager
def broker_errors(settings):
    """A broker we cannot reach or that refuses us (aiomqtt.MqttError) as a CommandError (status 1)."""
    from transports import mqtt
    try:
        yield
    except Exception as exc:
        if mqtt.is_mqtt_error(exc):
            raise _connection_error(settings, exc)
        raise


@contextlib.contextmanager
def publishing_errors(settings, what, state_dir):
    """The errors of a publication as CommandErrors: status 2 for one that cannot be made (``what``:
    the file or model it names), 1 for the record in ``state_dir`` or the broker."""
    from transports import mqtt
    with broker_errors(settings):
        try:
            yield
        except (NNCError, ValueError, mqtt.PublishError) as exc:
            raise CommandError("%s: %s" % (what, exc), EXIT_INVALID)
        except OSError as exc:
            raise CommandError("the publisher's record in %s: %s" % (state_dir, exc.strerror or exc))


def _publication(path, kind):
    """(bitstream, "full" or "update") for the file to publish."""
    if path.endswith(modelio.SUFFIXES):
        if kind == "update":
            raise CommandError("%s is a model file: make an update bitstream with 'nnc-edge update'" % path,
                               EXIT_INVALID)
        from ..encoder.encoding import encode
        tensors = read_model(path)
        try:
            return encode(tensors), "full"
        except ValueError as exc:
            raise CommandError("%s: %s" % (path, exc), EXIT_INVALID)
    data = read_input(path)
    if kind == "auto":
        from ..updates import read_update_info
        try:
            kind = "update" if read_update_info(data) is not None else "full"
        except NNCError as exc:
            raise CommandError("%s: %s" % (path, exc), EXIT_INVALID)
    return data, kind


@arguments("publish")
def _publish_arguments(parser):
    parser.add_argument("input", metavar="MODEL_OR_UPDATE",
                        help="an NNR bitstream (.nnc: a full model or an update) or a .safetensors/.npz model")
    parser.add_argument("--model", required=True, metavar="NAME", help="the model's name (one topic level)")
    parser.add_argument("--kind", choices=("auto", "full", "update"), default="auto",
                        help="publish as a full model or as an update of the current version (default: update if "
                             "the bitstream carries an update record)")
    parser.add_argument("--seq", type=_positive_int, metavar="N",
                        help="the version number to publish as (default: the current one + 1)")
    parser.add_argument("--max-message-bytes", type=_positive_int, default=64 << 10, metavar="BYTES",
                        help="largest MQTT payload (default %(default)d; 4096 or less for microcontroller clients)")
    parser.add_argument("--retries", type=int, default=5, metavar="N",
                        help="reconnect attempts after a lost connection (default %(default)d)")
    parser.add_argument("--state-dir", default=default_state_dir(), metavar="DIR",
                        help="where this host keeps its record of each model's published chain (version numbers, "
                             "digests, a copy of each bitstream), so that versions never go backwards and a chain "
                             "the broker lost is published again (default: $XDG_STATE_HOME/nnc-edge, else "
                             "~/.local/state/nnc-edge; now %(default)s)")
    parser.add_argument("--compact-at", type=_percent_or_off, default=50.0, metavar="PERCENT",
                        help="chain compaction: when the updates since the last full model add up to more than "
                             "PERCENT%% of its bitstream, publish the current model again as a full model too (the "
                             "next version) if that is the smaller download, so that devices that join later download "
                             "only that; devices that are "
                             "current switch to it without downloading. Not while a staged rollout is in progress. "
                             "0 turns it off (default %(default)g)")
    parser.add_argument("--residual", metavar="STATE",
                        help="the chain state file of nnc-edge update --residual: restarted at the compacted model "
                             "when the chain is compacted, so that the next update starts a new chain (updates "
                             "that continue the old chain's decoder state are refused after a compaction)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    from .fleet import add_wave_arguments
    add_wave_arguments(parser, publish=True)
    add_broker_arguments(parser)


# --- receive --------------------------------------------------------------------------------------
@command("receive", help="keep a model current from MQTT (the device service)",
         description="Subscribe to model NAME and keep its current version in DIR/model.safetensors, replaced "
                     "atomically after each full model or update (its version is in the file's metadata). "
                     "Catches up from the broker's retained messages after being offline, waits up to "
                     "--gap-timeout for missing messages and then drops the incomplete update (the model stays "
                     "as it was), and reconnects with exponential backoff when the broker goes away. Runs until "
                     "interrupted (SIGINT/SIGTERM), or with --once until the model is at the published version. "
                     "Logs each update applied or refused on stderr. The model it replaces is kept as "
                     "DIR/previous.safetensors (hard-linked, else copied): --health-check puts it back when a new "
                     "model fails the check, and a rollback publication of a version the device holds is taken "
                     "without downloading. Outside a staged rollout's wave the device stays at its version.",
         examples=("nnc-edge receive --broker mqtt://localhost --model kws --out /var/lib/kws",
                   "nnc-edge receive --broker mqtts://broker.example --cafile ca.crt -u kws-17 --model kws "
                   "--out model/",
                   "nnc-edge receive --broker mqtt://localhost --model kws --out model/ --once --timeout 60",
                   "nnc-edge receive --broker mqtt://localhost --model kws --out /var/lib/kws --id pi-7 "
                   "--health-check '/opt/kws/selftest \"$NNC_EDGE_MODEL\"' --health-timeout 120"))
def run_receive(args):
    # Settled first: before, -q/-v (or the config file's quiet/verbose) are still placeholders.
    args.config_options.settle(args)
    with logging_to_stderr(args):
        return _receive_command(args)


def _receive_command(args):
    from transports import mqtt
    _check_model_name(args.model)
    if args.device_id is not None:
        from transports.report import check_device_id
        try:
            check_device_id(args.device_id)
        except ValueError as exc:
            raise CommandError("--id: %s" % exc, EXIT_INVALID)
    settings = broker_settings(args)
    health = None
    if args.health_check is not None:
        if args.no_previous:
            raise CommandError("--health-check needs the previous model kept: drop --no-previous", EXIT_INVALID)
        from transports.mqtt.health import HealthCheck
        try:
            health = HealthCheck(args.health_check, args.health_timeout)
        except ValueError as exc:
            raise CommandError("--health-check: %s" % exc, EXIT_INVALID)
    try:
        store = mqtt.ModelStore(args.out, args.model, threads=args.threads, keep_previous=not args.no_previous)
    except (OSError, modelio.ModelFormatError) as exc:
        raise CommandError("cannot use %s: %s" % (args.out, exc))
    from .keys import receiver_verifier
    receiver = mqtt.Receiver(store, prefix=args.prefix, gap_timeout=args.gap_timeout,
                             verify=receiver_verifier(args, store), device_id=args.device_id, health_check=health)
    reached = asyncio.run(_receive(settings, receiver, args.once, args.timeout))
    if not reached:
        raise CommandError("model %s is not at the published version after %g s (the device has %s)"
                           % (args.model, args.timeout, store.describe()))
    if args.once and receiver.hold == "rolled-back":
        raise CommandError("model %s: version %s was rolled back (%s); the device has %s"
                           % (args.model, receiver.rolled_back_seq, receiver.failure[1] if receiver.failure else
                              "its health check failed", store.describe()))
    return 0


async def _receive(settings, receiver, once, timeout):
    from transports import mqtt
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    if once:
        receiver.on_current = stop.set
    task = asyncio.ensure_future(mqtt.run_receiver(settings, receiver, stop))
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.TimeoutError:
        stop.set()
        await task
        return False
    # settled: at the announced version, or at the newest its rollout wave allows, or held back by
    # a failed health check (which _receive_command reports).
    return not once or receiver.settled


@arguments("receive")
def _receive_arguments(parser):
    parser.add_argument("--model", required=True, metavar="NAME", help="the model's name (one topic level)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory that keeps the model")
    parser.add_argument("--gap-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                        help="how long to wait for a missing message before dropping the incomplete update "
                             "(default %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="exit (status 0) as soon as the model is at the version the publisher announces, or "
                             "at the newest its staged-rollout wave allows (status 1 when a health check rolled "
                             "it back)")
    parser.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                        help="give up after this long (exit status 1)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="decoding threads (default: the usable CPUs, at most 4: 1 on a Pi Zero, 4 on a Pi 5)")
    parser.add_argument("--health-check", metavar="CMD",
                        help="after each new model (full model, update or restore), run CMD through the shell "
                             "(/bin/sh -c) with NNC_EDGE_MODEL (the new model file), NNC_EDGE_PREVIOUS (the "
                             "previous one), NNC_EDGE_SEQ, NNC_EDGE_DIGEST, NNC_EDGE_KIND, NNC_EDGE_PREVIOUS_SEQ, "
                             "NNC_EDGE_MODEL_NAME and NNC_EDGE_DEVICE in its environment; a non-zero exit or "
                             "--health-timeout puts the previous model back (byte for byte, its chain state too), "
                             "reports rolled-back and never fetches that version again (recorded in "
                             "DIR/rolled-back.json)")
    parser.add_argument("--health-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                        help="how long the health check may run before it is killed and counts as failed "
                             "(default %(default)s)")
    parser.add_argument("--no-previous", action="store_true",
                        help="do not keep the previous model as DIR/previous.safetensors (saves a second model's "
                             "disk space where hard links are not available; no health check, and restores of "
                             "the previous version are downloaded)")
    parser.add_argument("--config", metavar="FILE",
                        help="read options from a TOML file: each key is a long option's name (broker, username, "
                             "password-file, cafile, cert, key, model, out, trusted-key, health-check, ...), "
                             "relative paths are "
                             "taken from the file's folder, and options on the command line win")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only problems")
    parser.add_argument("-v", "--verbose", action="store_true", help="log MQTT details too")
    add_broker_arguments(parser, device=True)
    parser.set_defaults(config_options=ConfigOptions(parser))


# --- receive --config -----------------------------------------------------------------------------
class _Default:
    """An option's default while the command line is parsed: a value still of this type was not given
    there, so a config file may set it."""

    def __init__(self, value):
        self.value = value

    def __str__(self):  # for --help's "(default %(default)s)"
        return str(self.value)


class ConfigOptions:
    """The options of a subcommand as a TOML config file may give them (``receive --config``).

    Made when the subcommand's parser is configured: defaults other than None are wrapped in _Default
    and required options become optional, so that settle() can tell what the command line gave and
    require what neither gave. Options added to the parser later must default to None.
    """

    # Options whose value is a path: relative ones are taken from the config file's folder.
    PATHS = ("out", "cafile", "cert", "key", "password-file", "trusted-key")
    # Never read from a file: config files are often readable by others, the password is not.
    REFUSED = ("config", "help", "password")

    def __init__(self, parser):
        self.parser = parser
        self.required = []
        for action in parser._actions:
            if action.option_strings and action.default not in (None, argparse.SUPPRESS):
                action.default = _Default(action.default)
            if action.required:
                action.required = False
                self.required.append(action)

    def options(self):
        """{config key: argparse action}: the long option's name without its dashes."""
        table = {}
        for action in self.parser._actions:
            names = [name[2:] for name in action.option_strings if name.startswith("--")]
            if names and names[0] not in self.REFUSED:
                table[names[0]] = action
        return table

    def settle(self, args):
        """Each option from the command line, else from args.config, else its default."""
        options = self.options()
        config = self.read(args.config, options) if args.config is not None else {}
        if args.password is not None:
            config.pop("password-file", None)  # the command line's password wins over the file's
        for key, action in options.items():
            value = getattr(args, action.dest)
            if value is None or isinstance(value, _Default):
                value = config.get(key, value.value if isinstance(value, _Default) else None)
            setattr(args, action.dest, value)
        missing = ["--" + key for key, action in options.items()
                   if action in self.required and getattr(args, action.dest) is None]
        if missing:
            raise CommandError("%s required, on the command line or in a --config file" % ", ".join(missing),
                               EXIT_INVALID)
        return args

    def read(self, path, options):
        try:
            import tomllib
        except ImportError:  # Python < 3.11: setup.py installs tomli there
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise CommandError("cannot read %s: %s" % (path, exc.strerror or exc))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise CommandError("%s: %s" % (path, exc), EXIT_INVALID)
        folder = os.path.dirname(os.path.abspath(path))
        values = {}
        for name, value in table.items():
            key = name.replace("_", "-")
            if key == "password":
                raise CommandError("%s: a config file holds no password: put it in a file of its own (mode 0600) "
                                   "and name that with password-file" % path, EXIT_INVALID)
            if key not in options:
                raise CommandError("%s: unknown option %r (the options: %s)" % (path, name, ", ".join(sorted(options))),
                                   EXIT_INVALID)
            values[key] = self.convert(path, key, options[key], value, folder)
        return values

    def convert(self, path, key, action, value, folder):
        """A TOML value as the command line's parsing would have left it."""
        def bad(expected):
            return CommandError("%s: %s must be %s, not %r" % (path, key, expected, value), EXIT_INVALID)

        if action.nargs == 0:  # a flag (--once, --insecure, ...)
            if not isinstance(value, bool):
                raise bad("true or false")
            return value
        many = isinstance(action, argparse._AppendAction)
        items = value if many and isinstance(value, list) else [value]
        out = []
        for item in items:
            if action.type is not None:
                if isinstance(item, bool) or not isinstance(item, (int, float, str)):
                    raise bad("a number")
                try:
                    item = action.type(str(item))
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    raise CommandError("%s: %s: %s" % (path, key, exc), EXIT_INVALID)
            elif not isinstance(item, str):
                raise bad("a string" + (" or a list of strings" if many else ""))
            elif key in self.PATHS:
                item = os.path.join(folder, item)
            out.append(item)
        return out if many else out[0]


# --- demo -----------------------------------------------------------------------------------------
@command("demo", help="train a model on this machine and keep a simulated device current over MQTT",
         description="The main job on one machine: a host trains a small numpy classifier for a few rounds on "
                     "synthetic data and publishes the full model, then each round's update; a device task "
                     "receives them over MQTT and applies them to its own model file. Each round prints the "
                     "update's size, the full model's size, and the device's accuracy next to the host's. "
                     "Without --broker an MQTT broker is started for the demo (amqtt in this process, else a "
                     "mosquitto process).",
         examples=("nnc-edge demo", "nnc-edge demo --rounds 10 --out device/",
                   "nnc-edge demo --broker mqtt://localhost:1883"))
def run_demo(args):
    # The table says what happened: log only problems, or everything with -v.
    with logging_to_stderr(argparse.Namespace(quiet=not args.verbose, verbose=args.verbose), logging.ERROR
                           if args.quiet else logging.WARNING):
        return _demo(args)


def _demo(args):
    from . import demo
    if args.broker is not None:
        settings = broker_settings(args)
    else:
        settings = None
        if any(getattr(args, name) for name in ("username", "password", "cafile", "cert", "key")):
            raise CommandError("connection options need --broker", EXIT_INVALID)
    try:
        return demo.run(settings, args, out=sys.stdout)
    except demo.DemoError as exc:
        raise CommandError(str(exc), exc.status)


@arguments("demo")
def _demo_arguments(parser):
    parser.add_argument("--rounds", type=_positive_int, default=5, help="training rounds (default %(default)d)")
    parser.add_argument("--model", default="demo", metavar="NAME",
                        help="model name on the broker (default %(default)s)")
    parser.add_argument("--out", metavar="DIR", help="the device's directory (default: a temporary one)")
    parser.add_argument("--max-message-bytes", type=_positive_int, default=4096, metavar="BYTES",
                        help="largest MQTT payload (default %(default)d, as for a microcontroller)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for data and training (default %(default)d)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only problems")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each publication and what the device does")
    add_broker_arguments(parser, required=False)
