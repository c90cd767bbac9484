"""What a device install (a Raspberry Pi, README "Raspberry Pi") relies on:

- ``nnc-edge receive --config FILE`` gives the settings the same flags give, flags win over the file,
  and a password never comes from it (``--password-file`` instead);
- deploy/nnc-edge-receive@.service passes ``systemd-analyze verify`` and its command line parses;
- signatures verify without ``cryptography`` (armhf has no wheel of it): transports/ed25519.py;
- the default thread count suits a 1-CPU Pi Zero and a 4-CPU Pi 5.
"""

import logging
import os
import shutil
import subprocess
import sys

import pytest

from nnc_edge import cli, parallel, signing
from nnc_edge.cli import mqtt as mqtt_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(REPO, "deploy", "nnc-edge-receive@.service")

# A key, and its signature of BITSTREAM as model "kws", sequence 7 (made once with nnc-edge's signer),
# so that verification is tested where cryptography cannot sign.
PUBLIC_PEM = b"""-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAq6s3lULmo5PyXlOQi+P0tvTaXIjSWpBXXhS9ubK5cCE=
-----END PUBLIC KEY-----
"""
BITSTREAM = b"nnc-edge 32-bit test bitstream"
SIGNATURE = """nnc-edge signature v1
model kws
sequence 7
parent 0000000000000000000000000000000000000000000000000000000000000000
sha256 ff1cd9f811eb093b8bafbcce6d204219c20cb2220da183d30559fc51af0c859b
key 534cf88b6e1ce3fe
signature 3e8567a26d2515e3ec63ad12e3e0e447f1715254a1690b08d227d3f90816bc283ff3301be2b587c2609bd62f8c02a59c3f928e1622363128d382e57d102a3d09
"""


# --- receive --config -------------------------------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    """Runs `nnc-edge receive ARGS` up to the connection and returns what it would connect with."""
    seen = []

    async def fake_receive(settings, receiver, once, timeout):
        seen.append((settings, receiver, once, timeout, logging.getLogger("nnc_edge").level))
        return True

    monkeypatch.setattr(mqtt_cli, "_receive", fake_receive)
    monkeypatch.delenv(mqtt_cli.PASSWORD_ENV, raising=False)

    def run(argv):
        del seen[:]
        status = cli.main(["receive"] + argv)
        assert status == 0
        settings, receiver, once, timeout, log_level = seen[0]
        store = receiver.store
        return {"broker": dict(vars(settings)), "topics": receiver.topics.base, "gap_timeout": receiver.gap_timeout,
                "verifies": receiver.verify is not None, "out": store.directory, "model": store.model,
                "threads": store.threads, "once": once, "timeout": timeout, "log_level": log_level}
    return run


@pytest.fixture
def files(tmp_path):
    for name, text in (("ca.crt", "ca"), ("client.crt", "cert"), ("client.key", "key"), ("password", "s3cret\n")):
        (tmp_path / name).write_text(text)
    (tmp_path / "publisher.pub").write_bytes(PUBLIC_PEM)
    return tmp_path


def write_config(folder, text):
    path = folder / "kws.toml"
    path.write_text(text)
    return str(path)


FLAGS = ["--broker", "mqtts://broker.example:8883", "-u", "kws-17", "--password-file", "{d}/password",
         "--cafile", "{d}/ca.crt", "--cert", "{d}/client.crt", "--key", "{d}/client.key", "--insecure",
         "--id", "pi-17", "--keepalive", "45", "--prefix", "plant", "--model", "kws", "--out", "{d}/model",
         "--gap-timeout", "12.5", "--trusted-key", "{d}/publisher.pub", "--threads", "2", "--once",
         "--timeout", "60", "--quiet"]
CONFIG = """
broker = "mqtts://broker.example:8883"
username = "kws-17"
password-file = "password"      # relative paths: from the config file's folder
cafile = "{d}/ca.crt"
cert = "client.crt"
key = "client.key"
insecure = true
id = "pi-17"
keepalive = 45
prefix = "plant"
model = "kws"
out = "model"
gap_timeout = 12.5
trusted-key = ["publisher.pub"]
threads = 2
once = true
timeout = 60
quiet = true
"""


def test_config_gives_the_settings_of_the_same_flags(captured, files):
    by_flags = captured([arg.format(d=files) for arg in FLAGS])
    by_config = captured(["--config", write_config(files, CONFIG.format(d=files))])
    assert by_flags == by_config
    assert by_config["broker"]["password"] == "s3cret" and by_config["threads"] == 2 and by_config["verifies"]
    # -q (or quiet = true) logs problems only; without it, each publication; -v also MQTT's details.
    assert by_config["log_level"] == logging.WARNING
    plain = ["--broker", "mqtt://localhost", "--model", "kws", "--out", str(files / "model")]
    assert captured(plain)["log_level"] == logging.INFO
    assert captured(plain + ["-v"])["log_level"] == logging.DEBUG


def test_flags_override_the_config(captured, files):
    config = write_config(files, CONFIG.format(d=files))
    got = captured(["--config", config, "--keepalive", "10", "--model", "vad", "-P", "other", "--threads", "1"])
    assert got["broker"]["keepalive"] == 10 and got["model"] == "vad" and got["threads"] == 1
    assert got["broker"]["password"] == "other"  # --password wins over the file's password-file
    assert got["out"] == str(files / "model") and got["gap_timeout"] == 12.5  # the rest from the file


def test_defaults_apply_when_neither_gives_an_option(captured, files):
    config = write_config(files, 'broker = "mqtt://localhost"\nmodel = "kws"\nout = "m"\n')
    got = captured(["--config", config])
    assert got["broker"]["keepalive"] == 30 and got["broker"]["password"] is None and got["threads"] is None
    assert got["gap_timeout"] == 30.0 and not got["once"] and not got["verifies"]
    assert got["topics"] == captured(["--broker", "mqtt://localhost", "--model", "kws", "--out", "m"])["topics"]


@pytest.mark.parametrize("text, message", [
    ('password = "s3cret"\n', "holds no password"),
    ('colour = "blue"\n', "unknown option 'colour'"),
    ('keepalive = 0\n', "keepalive: must be at least 1"),
    ('keepalive = "often"\n', "keepalive"),
    ('insecure = "yes"\n', "insecure must be true or false"),
    ('model = 3\n', "model must be a string"),
    ('broker = "mqtt://localhost"\nout = "m"\n', "--model required"),
    ('broker = [\n', "kws.toml"),
])
def test_bad_configs_are_refused(files, capsys, text, message):
    assert cli.main(["receive", "--config", write_config(files, text)]) == cli.EXIT_INVALID
    assert message in capsys.readouterr().err


def test_an_empty_password_file_means_no_password(captured, files):
    (files / "password").write_text("\n")
    got = captured(["--broker", "mqtt://localhost", "--model", "kws", "--out", str(files / "m"),
                    "--password-file", str(files / "password")])
    assert got["broker"]["password"] is None


# --- the systemd unit -------------------------------------------------------------------------------------
def unit_lines():
    with open(UNIT) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_unit_is_hardened_and_runs_receive_with_its_config():
    lines = unit_lines()
    for setting in ("DynamicUser=yes", "StateDirectory=nnc-edge/%i", "ProtectSystem=strict", "ProtectHome=yes",
                    "NoNewPrivileges=yes", "PrivateTmp=yes", "PrivateDevices=yes", "CapabilityBoundingSet=",
                    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
                    "Restart=on-failure", "StandardError=journal"):
        assert setting in lines, setting
    assert not any(line.startswith("SystemCallArchitectures=") for line in lines)  # armhf on an arm64 kernel
    (start,) = [line for line in lines if line.startswith("ExecStart=")]
    argv = start.split("=", 1)[1].split()
    assert argv[1:4] == ["receive", "--config", "/etc/nnc-edge/%i.toml"]
    # The command line parses (with the specifiers as systemd fills them in).
    filled = [a.replace("%i", "kws").replace("%S", "/var/lib").replace("%d", "/run/credentials/x") for a in argv[1:]]
    args = cli.build_parser().parse_args(filled)
    assert args.config == "/etc/nnc-edge/kws.toml" and args.out == "/var/lib/nnc-edge/kws"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # ExecStart must name an executable that exists here: the venv of the README is on the Pi.
    with open(UNIT) as f:
        text = f.read()
    unit = tmp_path / "nnc-edge-receive@.service"
    unit.write_text(text.replace("/opt/nnc-edge/venv/bin/nnc-edge", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "nnc-edge-receive@kws.service")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=120,
                            cwd=str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout


# --- verification without cryptography ----------------------------------------------------------------------
@pytest.fixture
def no_cryptography(monkeypatch):
    """As on armhf, where pip installs no cryptography: every import of it fails."""
    for name in [n for n in sys.modules if n == "cryptography" or n.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)


def test_signatures_verify_without_cryptography(no_cryptography, tmp_path):
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(PUBLIC_PEM)
    trusted = signing.TrustedKeys.load(str(pub))
    good = signing.Signature.from_text(SIGNATURE)
    assert signing.verify_bitstream(BITSTREAM, good, trusted, model="kws") is good
    with pytest.raises(signing.SignatureError, match="changed after signing"):
        signing.verify_bitstream(BITSTREAM + b"!", good, trusted)
    forged = SIGNATURE.replace("sequence 7", "sequence 8")
    with pytest.raises(signing.SignatureError, match="does not match"):
        signing.verify_bitstream(BITSTREAM, signing.Signature.from_text(forged), trusted)
    with pytest.raises(signing.SignatureError, match="need the .cryptography. package"):
        signing.SigningKey.generate()  # signing stays on the host


def test_key_files_are_checked_without_cryptography(no_cryptography, tmp_path):
    private = tmp_path / "key"
    private.write_bytes(b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
    with pytest.raises(signing.SignatureError, match="is a private key"):
        signing.TrustedKeys.load(str(private))
    rsa = tmp_path / "rsa.pub"
    rsa.write_bytes(b"-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAK==\n-----END PUBLIC KEY-----\n")
    with pytest.raises(signing.SignatureError, match="not a PEM Ed25519 key"):
        signing.TrustedKeys.load(str(rsa))


def test_both_verifiers_agree(tmp_path):
    pytest.importorskip("cryptography")
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(PUBLIC_PEM)
    trusted = signing.TrustedKeys.load(str(pub))
    (key,) = trusted.keys.values()
    assert key.key is not None  # cryptography's
    good = signing.Signature.from_text(SIGNATURE)
    bad = signing.Signature.from_text(SIGNATURE.replace("sequence 7", "sequence 8"))
    for sig in (good, bad):
        from transports import ed25519
        assert key.valid(sig.signature, sig.statement()) == ed25519.verify(key.raw, sig.statement(), sig.signature)


# --- threads -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 2), (4, 4), (8, 4), (64, 4)])
def test_default_threads_on_a_pi_zero_a_pi_5_and_bigger(monkeypatch, cpus, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert parallel.default_threads() == threads
    assert parallel.check_threads(None) == threads


def test_default_threads_follow_the_affinity_mask_not_the_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2}, raising=False)  # taskset -c 2, CPUAffinity=2
    assert parallel.default_threads() == 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert parallel.default_threads() == 4
