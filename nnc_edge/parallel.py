"""Parallel decoding with threads; results identical to serial decoding.

The compiled backend (decoder_core._deepcabac) releases the GIL in its position loop, so threads
decode at the same time on several cores:

- across NDUs: decoder_core.Decoder.plan_unit() parses units (sequentially: it is cheap) into
  PayloadJobs; a PayloadScheduler runs them on a thread pool and hands results back in stream order.
  Jobs of an update chain (temporal context adaptation / HDSP history of the same parameter) run one
  after the other, in stream order.
- within one tensor coded with scan_order > 0: its block rows start at entry points with fresh
  contexts (supplement 1.11), so a ChunkRunner decodes runs of block rows on the same pool.

With the pure-Python backend the threads only take turns under the GIL: results are the same.
"""

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from decoder_core import NNCError
from decoder_core.decoder import unit_spans


# The cores of a Raspberry Pi 3, 4 or 5. A device has its own work besides keeping its model current,
# and the small models it receives seldom keep more threads busy; a host can ask for more.
MAX_DEFAULT_THREADS = 4


def usable_cpus():
    """The CPUs this process may run on: its affinity mask where the OS has one (taskset, systemd's
    CPUAffinity=, a container's cpuset), which os.cpu_count() ignores; else the CPU count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads():
    """The default thread count: the usable CPUs, at most MAX_DEFAULT_THREADS. On a single-core Pi
    (Zero, Zero W, 1) that is 1, and decoding runs on the calling thread without a thread pool."""
    return min(usable_cpus(), MAX_DEFAULT_THREADS)


def check_threads(threads):
    """``threads`` as a positive int (None means default_threads())."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError("threads must be a positive integer, not %r" % (threads,))
    return threads


class ChunkRunner:
    """Runs fn(0), ..., fn(n - 1) on a thread pool and the calling thread; returns when all are done.

    This is the ``runner`` of decoder_core's compiled backend. The caller keeps taking chunks until none
    is left and then waits only for chunks that other threads are already running, so it may itself run
    on the pool (inside a PayloadJob) without any risk of deadlock.
    """

    def __init__(self, pool, workers):
        self.pool = pool
        self.workers = workers

    def run(self, n, fn):
        lock = threading.Lock()
        all_done = threading.Condition(lock)
        taken = [0]
        finished = [0]
        errors = {}

        def work():
            while True:
                with lock:
                    i = taken[0]
                    if i >= n:
                        return
                    taken[0] = i + 1
                try:
                    fn(i)
                except BaseException as exc:  # handed to the caller below
                    errors[i] = exc
                with lock:
                    finished[0] += 1
                    if finished[0] == n:
                        all_done.notify_all()

        for _ in range(min(self.workers, n) - 1):
            self.pool.submit(work)
        work()
        with lock:
            while finished[0] < n:
                all_done.wait()
        if errors:
            raise errors[min(errors)]


class PayloadScheduler:
    """Runs PayloadJobs on ``threads`` threads; results() yields their outputs in submission order.

    A job with ``chain_names`` starts only after the earlier jobs sharing one of those names have
    finished. Use as a context manager (the pool is shut down on exit).
    """

    def __init__(self, threads):
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nnc-edge")
        self.runner = ChunkRunner(self.pool, threads)
        self._last = {}          # chain name -> future of the last job using it
        self._pending = deque()  # futures in submission order

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.pool.shutdown(wait=True)

    def submit(self, job):
        result = Future()
        deps = [self._last[name] for name in job.chain_names if name in self._last]
        for name in job.chain_names:
            self._last[name] = result
        self._pending.append(result)
        if not deps:
            self.pool.submit(_run, job, result)
            return result
        waiting = [len(deps)]
        lock = threading.Lock()

        def dep_done(_):
            with lock:
                waiting[0] -= 1
                ready = waiting[0] == 0
            if ready:
                self.pool.submit(_run, job, result)

        for dep in deps:
            dep.add_done_callback(dep_done)
        return result

    def __len__(self):
        return len(self._pending)

    def results(self):
        """Yield each job's output (a list of (name, dims, values, levels)) in submission order; a job's
        error is raised when its turn comes."""
        while self._pending:
            yield self._pending.popleft().result()

    def discard(self):
        """Cancel the jobs not started yet, wait for the running ones, drop all outputs and errors."""
        for result in self._pending:
            result.cancel()
        while self._pending:
            result = self._pending.popleft()
            if not result.cancelled():
                result.exception()


def _run(job, result):
    if not result.set_running_or_notify_cancel():
        return
    try:
        out = job.run()
    except BaseException as exc:
        result.set_exception(exc)
    else:
        result.set_result(out)


def decode_units(core, data, threads):
    """Decode every unit of ``data`` with the decoder_core.Decoder ``core`` on ``threads`` threads.

    Returns (name, dims, values) in stream order, exactly as core.decode(data) would; the first error in
    stream order is raised (a payload's before a later unit's parse error).
    """
    if threads <= 1:
        return core.decode(data)
    core.decoded_bytes = 0  # a new stream for Limits.max_decoded_bytes, as core.decode() starts one
    out = []
    with PayloadScheduler(threads) as scheduler:
        core.runner = scheduler.runner
        try:
            try:
                for offset, end in unit_spans(data):
                    for job in core.plan_unit(data, offset, end):
                        scheduler.submit(job)
                core.finish()
            except NNCError:
                # Serial decoding would have stopped at an earlier payload's error first.
                for _ in scheduler.results():
                    pass
                raise
            for tensors in scheduler.results():
                for name, dims, values, _ in tensors:
                    out.append((name, tuple(dims), values))
        except BaseException:
            scheduler.discard()
            raise
        finally:
            core.runner = None
    return out
