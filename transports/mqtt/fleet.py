"""The fleet view: the retained reports (``transports.report``) that the devices of one model keep
at ``P/M/devices/ID``, read from the broker (``read_fleet``) with the model's retained status (the
version published and the staged-rollout wave), and waiting until every device that reports has
reached a version (``wait_for``).

The broker hands out every retained report at once on subscribing, then each new one as it comes;
nothing marks the end of the retained ones, so they are taken as complete after ``quiet`` seconds
without a message. A report is what anyone who may publish to the broker wrote: one that is too
large, too deep, not JSON, of the wrong types or under another device's topic is skipped with a
warning (logger ``nnc_edge.mqtt``) and counted in ``Fleet.skipped``.
"""

import asyncio
import time
from collections import Counter

from decoder_core import NNCError

from .. import envelope, report
from ..envelope import excerpt
from .settings import log, topics

QUIET = 0.5
DEFAULT_TIMEOUT = 10.0
# Beyond this the age says more about the device's clock (unset on many boards) than its report.
MAX_AGE = 10 * 365 * 86400


class Fleet:
    """The last report of each device of ``model``: ``devices`` maps the id to the parsed report;
    ``status``: the model's retained status (transports.envelope.Status; None when there is none or
    it is malformed)."""

    def __init__(self, prefix, model):
        t = topics(prefix, model)
        self.base = t.base
        self.status_topic = t.status
        self.model = model
        self.filter = self.base + "/devices/+"
        self.devices = {}
        self.skipped = 0
        self.status = None

    def add(self, topic, payload):
        """Take the message on one report topic (an empty one is a report being deleted) or on the
        status topic."""
        if topic == self.status_topic:
            self._add_status(payload)
            return
        device = topic[len(self.base + "/devices/"):]
        if not payload:
            self.devices.pop(device, None)
            return
        try:
            report.check_device_id(device)
            obj = report.parse_report(payload)
            if obj["id"] != device:
                raise NNCError("it names device %s" % excerpt(obj["id"]), None, "report id")
        except (NNCError, ValueError) as exc:
            self.skipped += 1
            log.warning("model %s: skipped the report on %s: %s", self.model, excerpt(topic, 120), exc)
            return
        self.devices[device] = obj

    def _add_status(self, payload):
        self.status = None
        if payload:
            try:
                status = envelope.parse_status(payload, self.model)
                status.rollout = report.parse_rollout(status.rollout)
            except NNCError as exc:
                log.warning("model %s: skipped its status: %s", self.model, exc)
                return
            self.status = status

    def published(self):
        """The status in words: "version 4 published (full model 1); versions 3 on to 34% (halted)"."""
        st = self.status
        if st is None or not st.seq:
            return "no version published"
        text = "version %d published (full model %d)" % (st.seq, st.full_seq)
        if st.pending is not None:
            text += ", version %d being published" % st.pending[0]
        return text + "; " + describe_wave(st.rollout)

    def reports(self):
        return [self.devices[d] for d in sorted(self.devices)]

    def laggards(self, seq):
        """The reports of devices that are not current at version ``seq`` or later."""
        return [r for r in self.reports() if r["state"] != report.CURRENT or (r.get("seq") or 0) < seq]

    def table(self, now=None):
        """One line per device (id, version, state, last error, age of its report), what the status
        announces, then the summary."""
        now = time.time() if now is None else now
        rows = [("DEVICE", "VERSION", "STATE", "AGE", "ERROR")]
        for r in self.reports():
            rows.append((printable(r["id"]), version_label(r), r["state"], _age(r.get("time"), now),
                         printable(r.get("error") or "-")))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows]
        return lines + [self.published(), self.summary()]

    def summary(self):
        reports = self.reports()
        versions = Counter(version_label(r) for r in reports)
        failed = sum(r["state"] in (report.FAILED, report.REJECTED, report.ROLLED_BACK) for r in reports)
        on = ", ".join("%d on %s" % (versions[v], v) for v in sorted(versions, key=_version_order))
        text = "%d device%s: %s; %d failed" % (len(reports), "" if len(reports) == 1 else "s", on or "none", failed)
        waiting = sum(r["state"] == report.WAITING for r in reports)
        if waiting:  # outside a staged rollout's wave (transports.mqtt.rollout)
            text += "; %d waiting" % waiting
        if self.skipped:
            text += "; %d report%s skipped" % (self.skipped, "" if self.skipped == 1 else "s")
        return text


def describe_wave(wave):
    """``wave`` (a parsed rollout or None) in words: "versions 5 on to 34% and 2 devices (halted)"."""
    if wave is None:
        return "no staged rollout (every device)"
    parts = []
    if wave.get("percent"):
        parts.append("%g%%" % wave["percent"])
    if wave.get("devices"):
        n = len(wave["devices"])
        parts.append("%d device%s" % (n, "" if n == 1 else "s"))
    text = "versions %d on to %s" % (wave["from"], " and ".join(parts) or "no device")
    return text + (" (halted)" if wave.get("halted") else "")


def version_label(r):
    if r["state"] == report.OFFLINE:
        return "?"
    seq = r.get("seq") or 0
    return "v%d" % seq if seq else "none"


def _version_order(text):
    return (0, 0) if text == "none" else (2, 0) if text == "?" else (1, int(text[1:]))


def _age(stamp, now):
    if stamp is None or not 0 <= now - stamp <= MAX_AGE:
        return "?"
    seconds = int(now - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def printable(text):
    # Ids and errors come from the network: no terminal escapes, no line breaks in the table.
    text = excerpt(text, 80, quote=False)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


async def read_fleet(settings, prefix, model, quiet=QUIET, timeout=DEFAULT_TIMEOUT):
    """The Fleet as the retained reports show it: read until ``quiet`` seconds pass without one (or
    ``timeout`` seconds in all, while reports keep coming)."""
    fleet = Fleet(prefix, model)
    await _read(settings, fleet, lambda settled: settled, quiet, timeout)
    return fleet


async def wait_for(settings, prefix, model, seq, timeout, quiet=QUIET):
    """(reached, fleet): reached once at least one device reports and every device reports being
    current at version ``seq`` or later (an offline device is not); False after ``timeout`` seconds."""
    fleet = Fleet(prefix, model)

    def reached(settled):
        return settled and bool(fleet.devices) and not fleet.laggards(seq)
    return await _read(settings, fleet, reached, quiet, timeout), fleet


async def _read(settings, fleet, finished, quiet, timeout):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    settled = False
    async with settings.client("fleet") as client:
        await client.subscribe(fleet.filter, qos=1)
        await client.subscribe(fleet.status_topic, qos=1)
        messages = client.messages.__aiter__()
        # One pending read, kept across timeouts: cancelling it could lose a report.
        waiter = asyncio.ensure_future(messages.__anext__())
        try:
            while not finished(settled):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                done, _ = await asyncio.wait((waiter,), timeout=min(remaining, quiet))
                if waiter in done:
                    message = waiter.result()
                    waiter = asyncio.ensure_future(messages.__anext__())
                    fleet.add(message.topic.value, message.payload)
                else:
                    settled = True
            return True
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
