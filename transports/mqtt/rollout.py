"""Fleet operations on the host (CPython): the staged-rollout wave in a model's retained status, watching
the devices of a wave, and restoring an older version (``nnc-edge rollout`` and ``nnc-edge rollback``).

The wave (``"rollout": {"from": S, "percent": P, "devices": [...], "halted": true}`` in the status; its
definition and the membership test are ``transports.report``'s) is started by a publication
(``Publisher.publish(..., rollout=...)``, ``nnc-edge publish --rollout``) and changed here:

* ``widen_wave`` computes the wider wave: it only widens (percent not lower, no device removed), so
  every device that took a version of the wave stays in it; ``resume`` clears ``halted``; a wave of
  100 percent is every device, and is removed from the status unless it is kept (to be halted).
* ``change_wave`` writes it: under the host's chain-record lock (``transports.chain_record``, so a
  publisher of the same model on this host does not write a status at the same time), it reads the
  retained status again, widens its wave and publishes the status retained with every other field
  as it was. The record keeps the wave too.
* ``watch`` reads the device reports (``transports.mqtt.fleet``) until every device of the wave that
  reports is current at the status's version or later (``Watch.DONE``), or ``max_failures`` devices
  of the wave report ``failed`` or ``rolled-back`` for a version of the wave (``Watch.FAILED``: the
  caller halts the wave with ``halt_wave``), or the timeout passes (``Watch.TIMEOUT``).

Rollback (``restore_publication``, ``rollback``): the record keeps the bitstreams of the current chain
(the last full model and the updates after it). Version SEQ on that chain is restored by a new full
model, version N + 1 (version numbers only rise), whose envelope names SEQ as its parent: SEQ's own
bitstream when SEQ is a full model; otherwise the chain decoded up to SEQ and coded again as a full
model that decodes to exactly SEQ's model (checked by its model digest; float tensors that coding
does not reproduce bit for bit go as their float32 values, NNR_PT_RAW_FLOAT). Devices that still hold SEQ switch to it without downloading; the others
download it. The status after it names no wave: a rollback is for every device.
"""

import asyncio

from decoder_core import NNCError

from .. import report
from ..envelope import FULL
from .fleet import QUIET, Fleet, describe_wave, printable, version_label
from .publisher import PublishError, read_status
from .settings import log, topics

DEFAULT_WATCH_TIMEOUT = 600.0
LOCK_WAIT = 60.0  # how long a wave change waits for a publisher of this host to finish


class RolloutError(Exception):
    """A wave change or a rollback that cannot be made (no wave, a narrower one, a version the record
    does not hold, ...); the message says why."""


# --- the wave -------------------------------------------------------------------------------------
def widen_wave(wave, percent=None, devices=None, resume=False, keep=False):
    """(the new wave or None, [notes]) for widening ``wave`` (a parsed rollout) to ``percent`` and the
    device list ``devices`` (each None: as it is). RolloutError when there is no wave or the change
    would narrow it. ``resume`` clears ``halted``; a halted wave stays halted otherwise (a note says
    so). At 100 percent the wave is every device and is removed (None), unless ``keep`` (a wave that
    may still be halted) or it stays halted."""
    if wave is None:
        raise RolloutError("the status names no staged rollout: start one with nnc-edge publish --rollout PERCENT "
                           "(or --devices)")
    notes = []
    old_percent = wave.get("percent", 0)
    new_percent = old_percent if percent is None else percent
    if not 0 <= new_percent <= 100:
        raise RolloutError("a wave's percent is in 0 .. 100, not %g" % new_percent)
    if new_percent < old_percent:
        raise RolloutError("the wave only widens: it is at %g%%, not less (devices that took version %d would "
                           "leave it)" % (old_percent, wave["from"]))
    old_devices = list(wave.get("devices", []))
    new_devices = old_devices if devices is None else sorted(set(devices))
    dropped = sorted(set(old_devices) - set(new_devices))
    if dropped:
        raise RolloutError("the wave only widens: --devices leaves out %s, in the wave now (list them too)"
                           % ", ".join(printable(d) for d in dropped))
    for device in new_devices:
        try:
            report.check_device_id(device)
        except ValueError as exc:
            raise RolloutError(str(exc))
    halted = bool(wave.get("halted"))
    if halted and resume:
        notes.append("the wave was halted; --resume lets it go on")
        halted = False
    elif halted:
        notes.append("the wave stays halted (no device takes versions %d and later): --resume lets it go on"
                     % wave["from"])
    elif resume:
        notes.append("the wave was not halted")
    if new_percent >= 100 and not halted and not keep:
        notes.append("100%: every device, the wave is removed from the status")
        return None, notes
    new = report.rollout_field(wave["from"], new_percent if (new_percent or "percent" in wave) else None,
                               new_devices if (new_devices or "devices" in wave) else None, halted)
    if new == wave:
        notes.append("the wave is as it was")
    return new, notes


async def _rewrite_status(settings, prefix, model, record, change, lock_wait=LOCK_WAIT):
    """Under the record's lock (waited for up to ``lock_wait`` seconds while a publisher holds it): read
    the retained status, ``change(status, old wave)`` it (returns the new wave, or raises), publish it
    retained. Returns (old wave, new Status). RecordError when the lock stays taken or the record is
    damaged."""
    from ..chain_record import RecordError
    t = topics(prefix, model)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lock_wait
    while True:
        entered = False
        try:
            with record.locked():
                entered = True
                record.load()
                async with settings.client("rollout") as client:
                    status = await read_status(client, t, model)
                    if not status.seq:
                        raise RolloutError("model %s has no published version (%r)" % (model, settings))
                    try:
                        old = report.parse_rollout(status.rollout)
                    except NNCError as exc:
                        raise RolloutError("the status's wave cannot be read: %s" % exc)
                    status.rollout = change(status, old)
                    await client.publish(t.status, status.payload(), qos=1, retain=True)
                if record.versions and record.seq == status.seq:
                    record.rollout = status.rollout
                    record.save()
                return old, status
        except RecordError:
            if entered or loop.time() >= deadline:
                raise
        await asyncio.sleep(0.2)  # a publisher of this host is at work: its status comes first


async def change_wave(settings, prefix, model, record, percent=None, devices=None, resume=False, keep=False):
    """Widen the wave of ``model`` in its retained status (see ``widen_wave``). ``record``: the host's
    ChainRecord of the model (its lock is held while the status is rewritten). Returns (old wave, new
    Status, notes). RolloutError when the wave cannot be changed so; RecordError (transports.chain_record)
    when the record is damaged or a publisher holds its lock for longer than LOCK_WAIT."""
    notes = []

    def change(status, old):
        new, said = widen_wave(old, percent, devices, resume, keep)
        notes.extend(said)
        return new
    old, status = await _rewrite_status(settings, prefix, model, record, change)
    log.info("model %s: %s, was %s", model, describe_wave(status.rollout), describe_wave(old))
    return old, status, notes


async def halt_wave(settings, prefix, model, record, first):
    """Mark the wave of versions ``first`` on as halted in the status. Returns the new Status, or None
    when the status names another wave by now (then it is left alone)."""
    halted = []

    def change(status, old):
        if old is None or old["from"] != first:
            log.warning("model %s: the status names %s by now, not the wave of version %d: not halted", model,
                        describe_wave(old), first)
            return old
        halted.append(True)
        return report.rollout_field(first, old.get("percent"), old.get("devices"), True)
    _, status = await _rewrite_status(settings, prefix, model, record, change)
    return status if halted else None


# --- watching a wave ------------------------------------------------------------------------------
class Watch:
    """The devices of a wave as their reports show them. ``status``: the status that announces the
    wave (``seq``: the version every device of the wave should reach; without a wave every device is
    in it and versions from ``status.seq`` count)."""

    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"

    def __init__(self, prefix, model, status, max_failures=None):
        self.fleet = Fleet(prefix, model)
        self.model = model
        self.seq = status.seq
        self.wave = report.parse_rollout(status.rollout)
        self.first = self.wave["from"] if self.wave else status.seq
        self.max_failures = max_failures
        self.failed = {}  # device id -> the report that failed (devices that failed stay counted)
        self.outcome = None

    def members(self):
        return [r for r in self.fleet.reports() if report.in_wave(r["id"], self.wave)]

    def outside(self):
        return [r for r in self.fleet.reports() if not report.in_wave(r["id"], self.wave)]

    def _failure(self, r):
        if r["state"] not in (report.FAILED, report.ROLLED_BACK):
            return False
        tried = r.get("target") or 0
        if r["state"] == report.ROLLED_BACK and isinstance(r.get("applied"), dict):
            applied = r["applied"].get("seq")
            if isinstance(applied, int) and not isinstance(applied, bool):
                tried = max(tried, applied)
        return tried >= self.first

    def laggards(self):
        """Devices of the wave not (yet) current at ``seq`` or later."""
        return [r for r in self.members() if r["state"] != report.CURRENT or (r.get("seq") or 0) < self.seq]

    def update(self):
        for r in self.members():
            if self._failure(r):
                self.failed[r["id"]] = r

    def finished(self, settled):
        self.update()
        if self.max_failures is not None and len(self.failed) >= self.max_failures:
            self.outcome = self.FAILED
        elif settled and not self.laggards():
            self.outcome = self.DONE
        return self.outcome is not None

    def progress(self):
        members = self.members()
        current = sum(r["state"] == report.CURRENT and (r.get("seq") or 0) >= self.seq for r in members)
        text = "version %d: %d of %d device%s of the wave current" % (
            self.seq, current, len(members), "" if len(members) == 1 else "s")
        others = {}
        for r in members:
            if not (r["state"] == report.CURRENT and (r.get("seq") or 0) >= self.seq):
                state = "behind" if r["state"] == report.CURRENT else r["state"]
                others[state] = others.get(state, 0) + 1
        text += "".join(", %d %s" % (n, s) for s, n in sorted(others.items()))
        if self.max_failures is not None:
            text += "; %d failed of at most %d" % (len(self.failed), self.max_failures)
        waiting = len(self.outside())
        if waiting:
            text += "; %d outside the wave" % waiting
        return text

    def failures(self):
        """One line per failed device: its id, state, version, and error."""
        return ["%s: %s at %s (target %s): %s" % (printable(r["id"]), r["state"], version_label(r),
                                                  r.get("target") if r.get("target") is not None else "-",
                                                  printable(r.get("error") or "no error given"))
                for r in (self.failed[d] for d in sorted(self.failed))]

    def describe_laggards(self):
        lagging = self.laggards()
        if not lagging:
            return "none"
        return ", ".join("%s (%s, %s)" % (printable(r["id"]), version_label(r), r["state"]) for r in lagging)


async def watch(settings, prefix, model, status, max_failures=None, timeout=DEFAULT_WATCH_TIMEOUT, progress=None,
                quiet=QUIET):
    """Read the device reports of ``model`` until the wave of ``status`` is done, failed or the time is
    out (see ``Watch``); ``progress(line)`` is called with a line whenever the picture changes.
    Returns the Watch (``outcome`` is Watch.DONE, FAILED or TIMEOUT). The reports read first are the
    retained ones: a device of the wave counts once it reports (a device that never reported is not
    known). With no device of the wave reporting, the wave is done once the retained reports are in."""
    w = Watch(prefix, model, status, max_failures)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    settled = False
    said = None
    async with settings.client("watch") as client:
        await client.subscribe(w.fleet.filter, qos=1)
        messages = client.messages.__aiter__()
        waiter = asyncio.ensure_future(messages.__anext__())
        try:
            while not w.finished(settled):
                if settled and progress is not None:
                    line = w.progress()
                    if line != said:
                        progress(line)
                        said = line
                remaining = deadline - loop.time()
                if remaining <= 0:
                    w.outcome = Watch.TIMEOUT
                    break
                done, _ = await asyncio.wait((waiter,), timeout=min(remaining, quiet))
                if waiter in done:
                    message = waiter.result()
                    waiter = asyncio.ensure_future(messages.__anext__())
                    w.fleet.add(message.topic.value, message.payload)
                else:
                    settled = True
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
    if progress is not None:
        line = w.progress()
        if line != said:
            progress(line)
    return w


# --- rollback -------------------------------------------------------------------------------------
def restore_publication(record, seq):
    """(bitstream, Version, model digest) for restoring version ``seq`` of the record's chain (see the
    module docstring). RolloutError when the record does not hold it, it is not older than the
    current version, its bitstream is missing, or its model cannot be coded exactly."""
    if not record.versions:
        raise RolloutError("this host has no record of model %s in %s: rollback needs the record nnc-edge publish "
                           "keeps there (--state-dir)" % (record.model, record.directory))
    if seq >= record.seq:
        raise RolloutError("version %d is not older than the current version %d" % (seq, record.seq)
                           if seq > record.seq else "version %d is the current version" % seq)
    return full_model_of(record, seq)


def full_model_of(record, seq):
    """(bitstream, Version, model digest) of a full model that decodes to exactly the model of version
    ``seq`` on the record's chain (the current version too: a compaction, see transports.mqtt.publisher):
    its own bitstream for a full model, else the chain decoded up to it and coded again
    (``exact_full_model``). RolloutError when the record does not hold it or a bitstream is missing."""
    import hashlib
    chain = []
    for v in record.versions:
        chain.append(v)
        if v.seq == seq:
            break
    else:
        raise RolloutError("version %d is no longer in the chain record (it holds %s): only the last full model "
                           "and the updates after it can be restored" % (seq, record.describe_range()))
    data = []
    for v in chain:
        if v.digest is None or not record.has_bitstream(v.digest):
            raise RolloutError("this host has no copy of version %d (record %s)" % (v.seq, record))
        bitstream = record.bitstream(v)
        if hashlib.sha256(bitstream).digest() != v.digest:
            raise RolloutError("the copy of version %d in %s is damaged" % (v.seq, record.directory))
        data.append(bitstream)
    import nnc_edge
    from nnc_edge.updates import apply_update, model_digest
    target = chain[-1]
    if target.kind == FULL:
        digest = target.model or model_digest(nnc_edge.decode(data[0]))
        return data[0], target, digest
    tensors = apply_update(nnc_edge.decode(data[0]), data[1:])
    digest = model_digest(tensors)
    if target.model is not None and digest != target.model:
        raise RolloutError("the chain up to version %d decodes to model %s, not to %s, the model its update record "
                           "names" % (seq, digest.hex()[:12], target.model.hex()[:12]))
    return exact_full_model(tensors, digest, seq), target, digest


def exact_full_model(tensors, digest, seq=None):
    """A full-model bitstream that decodes to exactly ``tensors`` (whose model digest is ``digest``)."""
    import numpy as np
    import nnc_edge
    from nnc_edge.encoder.encoding import encode
    from nnc_edge.updates import model_digest
    data = encode(tensors)
    view = nnc_edge.decode(data)
    inexact = [n for n in tensors if n not in view or view[n].shape != tensors[n].shape
               or view[n].dtype != tensors[n].dtype
               or not np.array_equal(np.ascontiguousarray(view[n]).view(np.uint8),
                                     np.ascontiguousarray(tensors[n]).view(np.uint8))]
    if inexact:
        data = encode(tensors, raw_float=frozenset(inexact))  # their float32 values themselves
        view = nnc_edge.decode(data)
    if model_digest(view) != digest:
        raise RolloutError("the model of version %s cannot be coded as a full model that decodes to exactly it "
                           "(model digest %s, not %s)" % (seq if seq is not None else "?",
                                                          model_digest(view).hex()[:12], digest.hex()[:12]))
    return data


async def rollback(publisher, seq):
    """Publish version ``seq`` of the record's chain again, as the new version N + 1 (a full model that
    names ``seq`` as the version it restores). ``publisher``: a transports.mqtt.Publisher with a
    ``record``. Returns the new Status. RolloutError for a version that cannot be restored,
    PublishError for a publication that cannot be made."""
    record = publisher.record
    if record is None:
        raise ValueError("a rollback needs the publisher's record of the chain")
    from ..chain_record import RecordError
    try:
        with record.locked():  # not while a publisher changes the chain; publish() locks again below
            record.load()
            if not record.exists:
                record.versions = []
            bitstream, version, digest = restore_publication(record, seq)
    except RecordError as exc:
        raise RolloutError(str(exc))
    try:
        return await publisher.publish(bitstream, FULL, restores=(version.seq, version.digest))
    except PublishError as exc:
        raise RolloutError(str(exc))


__all__ = ["RolloutError", "Watch", "widen_wave", "describe_wave", "change_wave", "halt_wave", "watch",
           "restore_publication", "full_model_of", "exact_full_model", "rollback", "DEFAULT_WATCH_TIMEOUT"]
