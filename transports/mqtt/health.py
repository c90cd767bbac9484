"""The health check a device runs after each apply (``nnc-edge receive --health-check CMD``): a
failing one makes ``transports.mqtt.device.Receiver`` put the previous model back (``rolled-back``).
"""

import asyncio
import os
import signal

from ..envelope import digest_hex

DEFAULT_HEALTH_TIMEOUT = 60.0


class HealthCheck:
    """``nnc-edge receive --health-check CMD``: after each apply (full model, update or restore) the
    receiver runs ``command`` through the shell (``/bin/sh -c CMD``, as systemd's ExecStartPre and
    cron do: quote paths with spaces) with the environment variables

    * ``NNC_EDGE_MODEL``: the path of the new model file (DIR/model.safetensors);
    * ``NNC_EDGE_PREVIOUS``: the previous model's (DIR/previous.safetensors; empty if there is none);
    * ``NNC_EDGE_SEQ``, ``NNC_EDGE_DIGEST``, ``NNC_EDGE_KIND``: the new version, and how it came
      (``full``, ``update`` or ``restore``); ``NNC_EDGE_PREVIOUS_SEQ`` (empty without one);
    * ``NNC_EDGE_MODEL_NAME``, ``NNC_EDGE_DEVICE``: the model's name and the device id (empty
      without one);

    its stdin from /dev/null, stdout and stderr the receiver's. Exit status 0 within ``timeout``
    seconds passes; anything else fails ("health check exited 3", "... timed out after 60 s": the
    check and all it started, its process group, are killed). It runs as an asyncio subprocess: the
    event loop, and the other devices of a gateway, go on meanwhile.
    """

    def __init__(self, command, timeout=DEFAULT_HEALTH_TIMEOUT):
        if not command or not command.strip():
            raise ValueError("the health check command is empty")
        if not timeout > 0:
            raise ValueError("the health check timeout must be positive")
        self.command = command
        self.timeout = timeout

    def __repr__(self):
        return "HealthCheck(%r, timeout=%g)" % (self.command, self.timeout)

    def environment(self, store, env, kind, device_id=None):
        previous = store.previous_version if os.path.exists(store.previous_path) else None
        return {"NNC_EDGE_MODEL": os.path.abspath(store.path),
                "NNC_EDGE_PREVIOUS": os.path.abspath(store.previous_path) if previous else "",
                "NNC_EDGE_SEQ": str(env.seq), "NNC_EDGE_DIGEST": digest_hex(env.digest), "NNC_EDGE_KIND": kind,
                "NNC_EDGE_PREVIOUS_SEQ": str(previous[0]) if previous else "",
                "NNC_EDGE_MODEL_NAME": store.model, "NNC_EDGE_DEVICE": device_id or ""}

    async def run(self, store, env, kind, device_id=None):
        """None when the check passes, else why it failed."""
        environ = dict(os.environ)
        environ.update(self.environment(store, env, kind, device_id))
        try:
            proc = await asyncio.create_subprocess_shell(self.command, env=environ, stdin=asyncio.subprocess.DEVNULL,
                                                         start_new_session=True)
        except OSError as exc:
            return "health check could not start: %s" % (exc.strerror or exc)
        try:
            status = await asyncio.wait_for(proc.wait(), self.timeout)
        except asyncio.TimeoutError:
            _kill_group(proc)
            await proc.wait()
            return "health check timed out after %g s" % self.timeout
        except BaseException:  # cancelled: the check goes with the receiver
            _kill_group(proc)
            raise
        if status == 0:
            return None
        if status < 0:
            return "health check killed by signal %d" % -status
        return "health check exited %d" % status


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the shell and whatever it started (start_new_session)
    except (OSError, AttributeError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass
