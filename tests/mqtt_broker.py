"""A private mosquitto for the MQTT tests and benchmarks: a free loopback port, a generated config,
optional password authentication (mosquitto_passwd) and TLS with a CA generated on the spot (openssl).

    broker = Mosquitto(tmp_path, auth=("device", "secret"), tls=True).start()
    ...  # broker.url, broker.cafile
    broker.kill(); broker.start()   # same port, same persistence file
    broker.stop()
"""

import os
import subprocess

from nnc_edge.cli.demo import LOOPBACK, MosquittoProcess, mosquitto_binary  # noqa: F401 (for the tests)


def _run(args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def make_test_ca(directory, host=LOOPBACK):
    """A CA and a server certificate for ``host`` (an IP address), made with the openssl command.

    Returns (cafile, certfile, keyfile)."""
    d = os.fspath(directory)
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=nnc-edge test CA",
          "-keyout", "ca.key", "-out", "ca.crt"], d)
    _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=%s" % host, "-keyout", "server.key",
          "-out", "server.csr"], d)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\n" % host)
    _run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
          "-days", "2", "-extfile", "server.ext", "-out", "server.crt"], d)
    return tuple(os.path.join(d, name) for name in ("ca.crt", "server.crt", "server.key"))


class Mosquitto(MosquittoProcess):
    """mosquitto with persistence (autosaved every second), and optionally a password file with the
    one user ``auth`` = (name, password) and no anonymous access, or TLS with a fresh test CA."""

    def __init__(self, directory, auth=None, tls=False, persistence=True):
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        lines = ["log_type all"]
        if persistence:
            lines += ["persistence true", "persistence_location %s/" % directory, "autosave_interval 1"]
        if auth is not None:
            passwd = os.path.join(directory, "passwd")
            _run(["mosquitto_passwd", "-b", "-c", passwd, auth[0], auth[1]], directory)
            lines += ["allow_anonymous false", "password_file %s" % passwd]
        else:
            lines += ["allow_anonymous true"]
        self.cafile = None
        if tls:
            self.cafile, cert, key = make_test_ca(directory)
            lines += ["cafile %s" % self.cafile, "certfile %s" % cert, "keyfile %s" % key]
        MosquittoProcess.__init__(self, directory, lines, scheme="mqtts" if tls else "mqtt")
        self.auth = auth

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
