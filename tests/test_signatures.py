"""Authenticated updates (nnc_edge.signing): valid signatures, a tampered byte, a wrong key, a replayed
sequence number and a missing signature, through the API, the command line (keygen, sign, verify,
apply --trusted-key) and the MQTT receiver (signature in the envelope, checked on the first message)."""

import asyncio
import os
import stat

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from nnc_edge import cli, modelio, signing
from nnc_edge.encoder.encoding import encode
from nnc_edge.signing import ReplayError, SignatureError
from nnc_edge.updates import encode_update
from transports import envelope, mqtt
from transports.envelope import FULL


@pytest.fixture(scope="module")
def key():
    return signing.SigningKey.generate()


@pytest.fixture(scope="module")
def other_key():
    return signing.SigningKey.generate()


def trusted_of(*keys):
    return signing.TrustedKeys([k.public_raw for k in keys])


DATA = bytes(range(256)) * 3
PARENT = bytes(range(32))


# --- the API --------------------------------------------------------------------------------------
def test_valid_signature_verifies_in_both_forms(key):
    sig = signing.sign_bitstream(DATA, key, 7, "kws", PARENT)
    assert signing.verify_bitstream(DATA, sig, trusted_of(key), model="kws", sequence=7, parent=PARENT) is sig
    again = signing.Signature.from_text(sig.to_text())
    assert again.to_text() == sig.to_text()
    signing.verify_bitstream(DATA, again, trusted_of(key))
    ext = sig.pack_ext()
    assert len(ext) == signing.EXT_BYTES
    unpacked = signing.unpack_ext(ext, "kws", 7, PARENT, signing.bitstream_digest(DATA))
    signing.verify_bitstream(DATA, unpacked, trusted_of(key))


def test_the_statement_covers_domain_model_sequence_parent_and_digest(key):
    sig = signing.sign_bitstream(DATA, key, 7, "kws", PARENT)
    message = sig.statement()
    assert message.startswith(signing.DOMAIN)
    assert message.endswith(PARENT + signing.bitstream_digest(DATA))
    # The same signature bytes claimed for any other field value do not verify.
    for field, value in (("model", "vad"), ("sequence", 8), ("parent", bytes(32)),
                         ("digest", signing.bitstream_digest(DATA[1:]))):
        fields = dict(model=sig.model, sequence=sig.sequence, parent=sig.parent, digest=sig.digest)
        fields[field] = value
        forged = signing.Signature(key_id=sig.key_id, signature=sig.signature, **fields)
        with pytest.raises(SignatureError, match="does not match"):
            trusted_of(key).verify(forged)
    # A signature made over the statement without the domain tag is not one of ours.
    raw = signing.Signature("kws", 7, PARENT, sig.digest, key.key_id, key.sign(message[len(signing.DOMAIN):]))
    with pytest.raises(SignatureError, match="does not match"):
        trusted_of(key).verify(raw)


def test_a_tampered_byte_is_refused(key):
    sig = signing.sign_bitstream(DATA, key, 1, "kws")
    for pos in (0, 100, len(DATA) - 1):
        tampered = bytearray(DATA)
        tampered[pos] ^= 0x01
        with pytest.raises(SignatureError, match="changed after signing"):
            signing.verify_bitstream(bytes(tampered), sig, trusted_of(key))
    with pytest.raises(SignatureError, match="changed after signing"):
        signing.verify_bitstream(DATA + b"\x00", sig, trusted_of(key))


def test_a_wrong_key_is_refused(key, other_key):
    sig = signing.sign_bitstream(DATA, other_key, 1, "kws")
    with pytest.raises(SignatureError, match="not a trusted key") as info:
        signing.verify_bitstream(DATA, sig, trusted_of(key))
    assert isinstance(info.value, NNCError)
    # Another key's signature presented under the trusted key's id.
    forged = signing.Signature("kws", 1, signing.NO_DIGEST, sig.digest, key.key_id, sig.signature)
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify_bitstream(DATA, forged, trusted_of(key))
    signing.verify_bitstream(DATA, sig, trusted_of(key, other_key))  # trusted once added


def test_a_missing_signature_is_refused(key, tmp_path):
    with pytest.raises(SignatureError, match="not signed"):
        signing.verify_bitstream(DATA, None, trusted_of(key))
    with pytest.raises(SignatureError, match="does not exist"):
        signing.Signature.load(str(tmp_path / "u.nnc.sig"))
    with pytest.raises(SignatureError, match="not signed"):
        signing.unpack_ext(b"", "kws", 1, signing.NO_DIGEST, signing.NO_DIGEST)
    with pytest.raises(SignatureError, match="no trusted public key"):
        signing.verify_bitstream(DATA, signing.sign_bitstream(DATA, key, 1, "kws"), signing.TrustedKeys())


def test_a_replayed_sequence_is_refused(key, tmp_path):
    store = signing.SequenceStore(str(tmp_path / "seq.json"))
    assert store.last("kws") is None
    store.check(signing.sign_bitstream(DATA, key, 1, "kws"))
    store.record("kws", 3)
    store.record("vad", 9)
    for old in (1, 3):
        with pytest.raises(ReplayError, match="not newer than sequence 3"):
            store.check(signing.sign_bitstream(DATA, key, old, "kws"))
    store.check(signing.sign_bitstream(DATA, key, 4, "kws"))
    store.check(signing.sign_bitstream(DATA, key, 4, "other"))  # per model
    assert signing.SequenceStore(store.path).last("vad") == 9


def test_malformed_signature_files_are_refused(key):
    text = signing.sign_bitstream(DATA, key, 1, "kws").to_text()
    for bad in ("", "hello\n", text.replace("sequence 1", "sequence x"), text.replace("model kws\n", ""),
                text + "model kws\n", text.replace("signature ", "signature 00")):
        with pytest.raises(SignatureError):
            signing.Signature.from_text(bad)


def test_key_files(tmp_path):
    path = str(tmp_path / "k")
    key = signing.SigningKey.generate()
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert signing.SigningKey.load(path).public_raw == key.public_raw
    assert list(signing.TrustedKeys.load(path + ".pub").keys) == [key.key_id]
    with pytest.raises(FileExistsError):
        signing.SigningKey.generate().save(path)
    with open(str(tmp_path / "junk"), "w") as f:
        f.write("not a key")
    with pytest.raises(SignatureError):
        signing.TrustedKeys.load(str(tmp_path / "junk"))


# --- the command line -----------------------------------------------------------------------------
def models(seed=0):
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}
    new = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    return base, new


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def signed_update(tmp_path, capsys):
    base, new = models()
    modelio.save(str(tmp_path / "base.safetensors"), base)
    with open(str(tmp_path / "u1.nnc"), "wb") as f:
        f.write(encode_update(base, new))
    assert cli.main(["keygen", "-o", str(tmp_path / "pub.key")]) == 0
    assert cli.main(["keygen", "-o", str(tmp_path / "other.key"), "-q"]) == 0
    assert cli.main(["sign", str(tmp_path / "u1.nnc"), "--key", str(tmp_path / "pub.key"), "--model", "kws"]) == 0
    capsys.readouterr()
    return tmp_path


def apply(d, update="u1.nnc", key="pub.key.pub", model="kws", out="dev.safetensors"):
    if not os.path.exists(str(d / out)):
        with open(str(d / out), "wb") as f:
            f.write(read(str(d / "base.safetensors")))
    return cli.main(["apply", "--base", str(d / out), str(d / update), "-o", str(d / out), "--trusted-key",
                     str(d / key), "--model", model, "-q"])


def test_cli_valid_signature_applies_once(signed_update, capsys):
    d = signed_update
    assert cli.main(["verify", str(d / "u1.nnc"), "--trusted-key", str(d / "pub.key.pub"), "--model", "kws"]) == 0
    assert "good signature, model kws, sequence 1" in capsys.readouterr().out
    assert apply(d) == 0
    base, new = models()
    assert not np.array_equal(modelio.load(str(d / "dev.safetensors"))["w"], base["w"])
    assert signing.SequenceStore(str(d / "nnc-edge-sequences.json")).last("kws") == 1
    # The same signed update again, to another copy of the base model: a replay.
    before = read(str(d / "base.safetensors"))
    assert apply(d, out="dev2.safetensors") == 2
    assert "refused as a replay" in capsys.readouterr().err
    assert read(str(d / "dev2.safetensors")) == before


def test_cli_applies_the_bytes_it_verified_not_a_later_copy_of_the_file(signed_update, monkeypatch):
    """A file swapped between verification and application must not be applied: the verified bytes
    are handed on, the file is not read again."""
    d = signed_update
    genuine = read(str(d / "u1.nnc"))
    from nnc_edge import cli as cli_module
    real_read_input = cli_module.read_input

    def read_then_swap(path):
        data = real_read_input(path)
        with open(path, "wb") as f:  # an attacker replaces the file right after it was read
            f.write(data[:-1] + bytes([data[-1] ^ 0x10]))
        return data
    monkeypatch.setattr("nnc_edge.cli.keys.read_input", read_then_swap)
    assert apply(d) == 0
    base, new = models()
    expected = nnc_edge.apply_update(base, genuine, allow_anonymous=False)
    got = modelio.load(str(d / "dev.safetensors"))
    for name in expected:
        assert np.array_equal(got[name], expected[name])


def test_cli_tampered_update_is_refused_before_applying(signed_update, capsys):
    d = signed_update
    data = bytearray(read(str(d / "u1.nnc")))
    data[-1] ^= 0x10
    with open(str(d / "u1.nnc"), "wb") as f:
        f.write(bytes(data))
    assert cli.main(["verify", str(d / "u1.nnc"), "--trusted-key", str(d / "pub.key.pub")]) == 2
    assert "changed after signing" in capsys.readouterr().err
    assert apply(d) == 2
    assert "changed after signing" in capsys.readouterr().err
    assert read(str(d / "dev.safetensors")) == read(str(d / "base.safetensors"))
    assert not os.path.exists(str(d / "nnc-edge-sequences.json"))


def test_cli_wrong_key_missing_signature_and_wrong_model_are_refused(signed_update, capsys):
    d = signed_update
    assert apply(d, key="other.key.pub") == 2
    assert "not a trusted key" in capsys.readouterr().err
    assert apply(d, model="vad") == 2
    assert "for model 'kws', not 'vad'" in capsys.readouterr().err
    os.remove(str(d / "u1.nnc.sig"))
    assert apply(d) == 2
    assert "no signature" in capsys.readouterr().err
    assert read(str(d / "dev.safetensors")) == read(str(d / "base.safetensors"))
    assert cli.main(["apply", "--base", str(d / "dev.safetensors"), str(d / "u1.nnc"), "-o",
                     str(d / "dev.safetensors"), "--trusted-key", str(d / "pub.key.pub")]) == 2
    assert "--model" in capsys.readouterr().err


def test_cli_sign_needs_a_sequence_for_a_stream_without_update_record(tmp_path, capsys):
    base, _ = models()
    with open(str(tmp_path / "m.nnc"), "wb") as f:
        f.write(encode(base))
    assert cli.main(["keygen", "-o", str(tmp_path / "k"), "-q"]) == 0
    assert cli.main(["sign", str(tmp_path / "m.nnc"), "--key", str(tmp_path / "k"), "--model", "kws"]) == 2
    assert "--sequence" in capsys.readouterr().err
    assert cli.main(["sign", str(tmp_path / "m.nnc"), "--key", str(tmp_path / "k"), "--model", "kws",
                     "--sequence", "5", "-q"]) == 0
    sig = signing.Signature.load(str(tmp_path / "m.nnc.sig"))
    assert (sig.sequence, sig.parent) == (5, signing.NO_DIGEST)
    assert cli.main(["keygen", "-o", str(tmp_path / "k")]) == 1  # not overwritten


# --- MQTT: the signature in the envelope ----------------------------------------------------------
def publication(model, seq, data, key=None):
    """(status payload, [message payloads]) of a full model published as version ``seq``."""
    bodies = mqtt.split_bitstream(data, 1024)
    ext = signing.envelope_signer(key) if key is not None else b""
    sign = (lambda digest: ext(model, seq, envelope.NO_DIGEST, digest)) if key is not None else b""
    digest, payloads = envelope.messages(model, FULL, seq, bodies, ext=sign)
    return envelope.Status(model, seq, digest, seq, [len(payloads)]).payload(), payloads


def receive(rx, model, seq, status, payloads):
    topics = mqtt.topics("nnc", model)

    async def go():
        await rx.handle(topics.status, status)
        for i, p in enumerate(payloads):
            await rx.handle(topics.data(seq, i), p)
    asyncio.run(go())


def device(tmp_path, key, clock):
    store = mqtt.ModelStore(tmp_path / "dev", "kws", threads=1)
    verify = signing.envelope_verifier(trusted_of(key), lambda: store.version[0] if store.version else None)
    return store, mqtt.Receiver(store, verify=verify, clock=lambda: clock[0])


def test_mqtt_signed_publication_is_applied_and_others_refused(tmp_path, key, other_key):
    base, new = models(1)
    full = encode(base)
    clock = [0.0]
    store, rx = device(tmp_path, key, clock)
    # Unsigned, and signed by another key: refused on the first message, nothing written.
    for signer in (None, other_key):
        receive(rx, "kws", 2, *publication("kws", 2, full, signer))
        assert store.version is None and not os.path.exists(store.path)
    assert "not signed" in rx.events[0] and "not a trusted key" in rx.events[1]
    # Tampered after signing: the signature holds, the digest of what arrived does not.
    status, payloads = publication("kws", 3, full, key)
    last = bytearray(payloads[-1])
    last[-1] ^= 0x01
    receive(rx, "kws", 3, status, payloads[:-1] + [bytes(last)])
    assert store.version is None and not os.path.exists(store.path)
    assert "does not match the envelope's digest" in rx.events[-1]
    # Signed by the trusted key: applied (the digest a damaged copy carried is retried after a pause,
    # not refused for good).
    clock[0] += rx.gap_timeout + 1
    status, payloads = publication("kws", 5, full, key)
    receive(rx, "kws", 5, status, payloads)
    assert store.version is not None and store.version[0] == 5
    want = nnc_edge.decode(full)
    got = modelio.load(store.path)
    assert all(np.array_equal(got[n], want[n]) for n in want)
    # An older genuine publication replayed with a forged status: refused, the model stays at 5.
    before = read(store.path)
    receive(rx, "kws", 4, *publication("kws", 4, encode(new), key))
    assert store.version[0] == 5 and read(store.path) == before
    assert "refused as a replay" in rx.events[-1]


def test_a_private_key_is_refused_as_a_trusted_key(signed_update, capsys):
    """Issue 16, finding 11: a device given the publisher's private key would hold what signs updates."""
    d = signed_update
    private = str(d / "pub.key")
    message = ("%s is a private key: a device trusts the public key (KEY.pub, which nnc-edge keygen writes beside "
               "it); keep the private key on the publishing host" % private)
    with pytest.raises(SignatureError) as info:
        signing.TrustedKeys.load(private)
    assert str(info.value) == message
    before = read(str(d / "base.safetensors"))
    assert apply(d, key="pub.key") == 2
    assert capsys.readouterr().err == "nnc-edge apply: error: %s\n" % message
    assert read(str(d / "dev.safetensors")) == before
    assert not os.path.exists(str(d / "nnc-edge-sequences.json"))
    assert cli.main(["verify", str(d / "u1.nnc"), "--trusted-key", private]) == 2
    assert capsys.readouterr().err == "nnc-edge verify: error: %s\n" % message


def test_apply_names_the_update_it_refuses(signed_update, capsys):
    """The verified bytes are applied, not the file: refusals still name the file."""
    d = signed_update
    base, new = models()
    second = encode_update(new, base, sequence=2)  # an update of another model than the device's
    (d / "u2.nnc").write_bytes(second)
    assert cli.main(["sign", str(d / "u2.nnc"), "--key", str(d / "pub.key"), "--model", "kws", "-q"]) == 0
    assert apply(d, update="u2.nnc") == 2
    err = capsys.readouterr().err
    assert err.startswith("nnc-edge apply: error: %s: update 2 applies to the model with digest " % (d / "u2.nnc"))
