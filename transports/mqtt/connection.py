"""Keeping a connection to the broker: the device's run loop (``run_receiver``), and what the
publisher shares with it: reconnecting with exponential backoff, dropping aiomqtt's unretrieved
disconnect, and quieting asyncio's harmless socket races. aiomqtt is imported on first use.
"""

import asyncio
import contextlib
import errno
import functools
import random

from .. import report
from .settings import log


def backoff_delays(initial=1.0, maximum=60.0):
    """Exponential backoff with jitter: about initial, 2 initial, 4 initial, ... up to maximum."""
    delay = initial
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, maximum)


def _forget_disconnect(client):
    # aiomqtt keeps an unexpected disconnection as a future's exception, which nobody retrieves when
    # the error surfaced elsewhere (asyncio would log "exception was never retrieved").
    future = getattr(client, "_disconnected", None)
    if future is not None and future.done() and not future.cancelled():
        future.exception()


@contextlib.contextmanager
def _quiet_socket_races(loop):
    """Drop one harmless asyncio error while in the block: aiomqtt registers paho's socket with the
    event loop through call_soon_threadsafe, and when paho closed the socket in between (a lost
    connection), asyncio logs "Exception in callback ... add_writer(...)" with a traceback for
    "Bad file descriptor". Other errors go to the handler that was there before."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiet_socket_races", False):
        yield
        return

    def handler(loop, context):
        if _socket_race(context):
            log.debug("ignored: %s", context.get("message"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    handler.quiet_socket_races = True
    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)


def _socket_race(context):
    exc = context.get("exception")
    callback = getattr(context.get("handle"), "_callback", None)
    closed = (isinstance(exc, OSError) and exc.errno == errno.EBADF) or isinstance(exc, ValueError)  # fd -1
    return closed and getattr(callback, "__name__", None) in ("add_reader", "add_writer")


def is_mqtt_error(exc):
    import aiomqtt
    return isinstance(exc, aiomqtt.MqttError)


async def run_receiver(settings, receiver, stop=None, backoff=(1.0, 60.0), tick=1.0):
    """Keep the receiver connected until ``stop`` (an asyncio.Event) is set: subscribe to the status
    and to the receiver's data topic, hand it every message, and reconnect after a lost connection
    with exponential backoff. A receiver with a device id connects as that device (its client id,
    whatever ``settings`` says, so that many devices may share one ``settings``) with its last will,
    and publishes its report on every change."""
    stop = stop or asyncio.Event()
    recover = getattr(receiver, "recover", None)
    if recover is not None:
        await recover()  # a health check a restart interrupted runs again first
    with _quiet_socket_races(asyncio.get_running_loop()):
        await _keep_connected(settings, receiver, stop, backoff, tick)


async def _keep_connected(settings, receiver, stop, backoff, tick):
    import aiomqtt
    delays = backoff_delays(*backoff)
    identity = {}
    if receiver.device_id is not None:
        identity = {"identifier": report.client_id(receiver.device_id),
                    "will": (receiver.report_topic, report.will_payload(receiver.device_id))}
    while not stop.is_set():
        client = None
        try:
            async with settings.client("dev", **identity) as client:
                _log(receiver).info("model %s: connected to %r, the device has %s", receiver.model, settings,
                         receiver.store.describe())
                delays = backoff_delays(*backoff)
                await _serve(client, receiver, stop, tick)
        except aiomqtt.MqttError as exc:
            _forget_disconnect(client)
            if stop.is_set():
                break
            delay = next(delays)
            _log(receiver).warning("model %s: connection to %r: %s; reconnecting in %.1f s", receiver.model, settings,
                                   exc, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass


async def _serve(client, receiver, stop, tick):
    await client.subscribe(receiver.topics.status, qos=1)
    subscribed = None
    messages = client.messages.__aiter__()
    waiter = None
    stopper = asyncio.ensure_future(stop.wait())
    receiver.subscribed = None
    receiver.connected = True
    # Published again on each connection: the last will may have replaced it in between.
    receiver.reported = None
    receiver.send_report = functools.partial(_send_report, client, receiver)
    try:
        await receiver.flush_report()
        while not stop.is_set():
            want = receiver.subscription()
            if want != subscribed or receiver.resubscribe:
                if subscribed is not None:
                    await client.unsubscribe(subscribed)
                receiver.resubscribe = False
                subscribed = None
                if want is not None:
                    await client.subscribe(want, qos=1)
                    subscribed = want
                receiver.subscribed = subscribed
            # One pending read at a time, kept across ticks: cancelling it could lose a message.
            if waiter is None:
                waiter = asyncio.ensure_future(messages.__anext__())
            done, _ = await asyncio.wait((waiter, stopper), timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                message = waiter.result()
                waiter = None
                await receiver.handle(message.topic.value, message.payload)
            receiver.tick()
            await receiver.flush_report()
    finally:
        receiver.connected = False
        receiver.send_report = None
        for task in (waiter, stopper):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (waiter, stopper) if t is not None), return_exceptions=True)


async def _send_report(client, receiver, payload):
    import aiomqtt
    try:
        await client.publish(receiver.report_topic, payload, qos=1, retain=True)
    except aiomqtt.MqttError as exc:
        # The connection is going: the report is sent again once it is back. Raising here would make
        # the receiver drop the publication it is applying.
        receiver.reported = None
        _log(receiver).debug("model %s: report not sent: %s", receiver.model, exc)


def _log(receiver):
    # The receiver's logger names its device (many may share a process); a bare one has none.
    return getattr(receiver, "log", None) or log
