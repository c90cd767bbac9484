"""The ``nnc-edge`` command line.

Subcommands live in a registry so that other modules can add their own without editing this
one: decorate ``run(args) -> exit status`` with ``@command(...)``, add arguments with
``@arguments(name)``, and put the module in EXTENSIONS. ``@alternative(name, dest)`` lets a module
take over an existing subcommand when one of its own options is given (``decode --stream``).

Exit status: 0 success, 1 an input or output file cannot be read or written, 2 invalid bitstream
(NNCError) or invalid command line.
"""

import argparse
import importlib
import os
import sys
import textwrap

import decoder_core
from decoder_core import NNCError

from .. import __version__, modelio
from ..decoding import empty_bitstream

# Modules that register further subcommands or options when imported.
EXTENSIONS = ("nnc_edge.cli.decode", "nnc_edge.cli.stream", "nnc_edge.cli.encode", "nnc_edge.cli.mqtt",
              "nnc_edge.cli.update", "nnc_edge.cli.keys", "nnc_edge.cli.fleet")

EXIT_IO = 1
EXIT_INVALID = 2


class CommandError(Exception):
    """A failure reported as one line on stderr with the given exit status, without a traceback."""

    def __init__(self, message, status=EXIT_IO):
        Exception.__init__(self, message)
        self.status = status


class Command:
    """One subcommand: help texts, the functions adding its arguments, and its handlers."""

    def __init__(self, name, run, help, description, examples):
        self.name = name
        self.run = run
        self.help = help
        self.description = description
        self.examples = examples
        self.configure = []
        self.alternatives = []  # (dest, run): run handles the command when args.<dest> is set

    def add_parser(self, subparsers):
        epilog = None
        if self.examples:
            epilog = "examples:\n" + "\n".join("  " + e for e in self.examples)
        parser = subparsers.add_parser(self.name, help=self.help,
                                       description=textwrap.fill(self.description or self.help, 78),
                                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        for configure in self.configure:
            configure(parser)
        parser.set_defaults(command=self)
        return parser

    def handler(self, args):
        for dest, run in self.alternatives:
            if getattr(args, dest, None):
                return run
        return self.run


COMMANDS = {}


def command(name, help, description=None, examples=()):
    """Decorator: register run(args) -> exit status as subcommand ``name``."""
    def register(run):
        if name in COMMANDS:
            raise ValueError("nnc-edge subcommand %r is registered twice" % name)
        COMMANDS[name] = Command(name, run, help, description, examples)
        return run
    return register


def arguments(name):
    """Decorator: register configure(parser), which adds arguments to subcommand ``name``."""
    def register(configure):
        COMMANDS[name].configure.append(configure)
        return configure
    return register


def alternative(name, dest):
    """Decorator: run(args) handles subcommand ``name`` instead of its own handler when args.<dest> is set."""
    def register(run):
        COMMANDS[name].alternatives.append((dest, run))
        return run
    return register


def backend_name():
    """The decoding backend decoder_core uses now."""
    get = getattr(decoder_core, "backend_name", None)
    return get() if get is not None else "pure-python"


def read_input(path):
    """The bytes of a bitstream file; CommandError: status 1 when it cannot be read, 2 when it is
    empty (what a failed download leaves; never a model)."""
    data = _read(path)
    if not data:
        raise invalid(path, empty_bitstream())
    return data


def check_readable(path):
    """CommandError (status 1) unless the file at path can be read."""
    _read(path, 0)


def _read(path, size=-1):
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as exc:
        raise CommandError("cannot read %s: %s" % (path, exc.strerror or exc))


def read_model(path, read=modelio.load):
    """``read(path)`` of a model file; CommandError: status 2 for a file that is not a valid model
    (the message, a ModelFormatError's, names the file), 1 for one that cannot be read."""
    try:
        return read(path)
    except modelio.ModelFormatError as exc:
        raise CommandError(str(exc), EXIT_INVALID)
    except OSError as exc:
        raise CommandError("cannot read %s: %s" % (path, exc.strerror or exc))


def invalid(path, exc):
    """The CommandError for an NNCError raised while decoding the file at path."""
    return CommandError("%s: %s" % (path, exc), EXIT_INVALID)


def build_parser():
    for module in EXTENSIONS:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="nnc-edge",
        description="ISO/IEC 15938-17 Neural Network Coding (NNC): encode, decode and inspect NNR bitstreams,\n"
                    "make and apply updates, and deliver them to devices over MQTT (publish, receive,\n"
                    "fleet, rollout, rollback).",
        epilog="exit status: 0 success, 1 a file cannot be read or written, 2 invalid bitstream or usage.\n"
               "Run 'nnc-edge COMMAND --help' for a command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version="nnc-edge %s (decoding backend: %s)" % (__version__, backend_name()))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd.add_parser(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_INVALID
    try:
        status = args.command.handler(args)(args) or 0
        sys.stdout.flush()
        return status
    except CommandError as exc:
        sys.stderr.write("nnc-edge %s: error: %s\n" % (args.command.name, exc))
        return exc.status
    except NNCError as exc:
        sys.stderr.write("nnc-edge %s: error: %s\n" % (args.command.name, exc))
        return EXIT_INVALID
    except BrokenPipeError:
        # The reader of our output went away (nnc-edge inspect ... | head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


# --- inspect --------------------------------------------------------------------------------------
