"""A private mosquitto for the MQTT tests and benchmarks: a free loopback port, a generated config,
optional password authentication (mosquitto_passwd) and TLS with a CA generated on the spot (openssl).

    broker = Mosquitto(tmp_path, auth=("device", "secret"), tls=True)
    broker.start()
    ...  # broker.url, broker.cafile
    broker.kill(); broker.start()   # same port, same persistence file
    broker.stop()
"""

import os
import shutil
import signal
import socket
import subprocess
import time

LOOPBACK = "127.0.0.1"


def mosquitto_binary():
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if os.path.exists(p)), None)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


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


class Mosquitto:
    """One mosquitto process on a free loopback port, with its files in ``directory``."""

    def __init__(self, directory, auth=None, tls=False, persistence=True, port=None):
        self.binary = mosquitto_binary()
        if self.binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or free_port()
        self.auth = auth
        self.cafile = None
        self.proc = None
        self.log = os.path.join(self.directory, "mosquitto.log")
        lines = ["listener %d %s" % (self.port, LOOPBACK), "log_dest file %s" % self.log, "log_type all",
                 "user %s" % _user()]
        if persistence:
            lines += ["persistence true", "persistence_location %s/" % self.directory, "autosave_interval 1"]
        if auth is not None:
            passwd = os.path.join(self.directory, "passwd")
            _run(["mosquitto_passwd", "-b", "-c", passwd, auth[0], auth[1]], self.directory)
            lines += ["allow_anonymous false", "password_file %s" % passwd]
        else:
            lines += ["allow_anonymous true"]
        if tls:
            self.cafile, cert, key = make_test_ca(self.directory)
            lines += ["cafile %s" % self.cafile, "certfile %s" % cert, "keyfile %s" % key]
        self.config = os.path.join(self.directory, "mosquitto.conf")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.url = "%s://%s:%d" % ("mqtts" if tls else "mqtt", LOOPBACK, self.port)

    def start(self, timeout=10.0):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen([self.binary, "-c", self.config], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited with status %d: %s%s" % (
                    self.proc.returncode, self.proc.stderr.read().decode(errors="replace"), self.tail()))
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not open port %d within %.0f s%s" % (self.port, timeout, self.tail()))

    def tail(self, lines=20):
        try:
            with open(self.log, errors="replace") as f:
                return "\n" + "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def kill(self):
        """SIGKILL: no goodbye, no final save (only what autosave wrote survives)."""
        self._end(signal.SIGKILL)

    def stop(self):
        """SIGTERM: a clean shutdown that saves the retained messages."""
        self._end(signal.SIGTERM)

    def _end(self, sig):
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _user():
    # mosquitto started as root drops to the user named here; keep the current one so it can
    # write its persistence file in our directory.
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name
