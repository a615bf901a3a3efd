"""Multi-host liveness: a thread in every process that notices a dead or silent peer and ends this
process with one clear line (which process, where to resume) instead of leaving it in a collective.

JAX's coordination service also ends the job when a process stops sending heartbeats, but from a C++
thread with a fatal log and SIGABRT, after the whole `heartbeat_timeout`; its missed-heartbeat hook
cannot be set from Python in jax 0.10 (the status does not convert: std::bad_cast). So the processes
keep their own heartbeat in the service's key-value store and declare a peer dead after half that
timeout, before the service would abort them. A process that finished its work beats on at a barrier
until every peer has finished too (`finish`), so that none of them dies unreported after it.

A peer's death can reach the main thread first, as an error from the collective it was in (a
JaxRuntimeError a few seconds after the kill, in our tests). `end_after_error` then gives the
watchdog time to name the dead peer, and keeps this process out of the shutdown barrier, which
would wait for that peer until the service aborts."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

# The distributed client lives only in jax's private state (orbax and multihost_utils read it there too).
from jax._src import distributed

from editx_jax.cli import error_line

PREFIX = "editx/peers"
FINISH_TIMEOUT_MS = 2**31 - 1  # no limit of its own: a dead peer is the watchdog's to report


class PeerWatchdog:
    """Heartbeat every `interval` seconds; a peer whose count has not moved for `stale_after` seconds
    (or a coordination service that no longer answers: process 0 is gone) ends this process with
    `error: ...` and exit status 1. `resume_hint()` says where the run can be resumed from."""

    def __init__(self, client, me: int, count: int, stale_after: float, resume_hint: Callable[[], str], *,
                 interval: float = 1.0):
        self.client, self.me, self.count = client, me, count  # client: jax's key-value and barrier calls
        self.stale_after, self.interval, self.resume_hint = stale_after, interval, resume_hint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peer-watchdog", daemon=True)

    @classmethod
    def for_this_job(cls, stale_after: float, resume_hint: Callable[[], str]) -> PeerWatchdog:
        """The watchdog of this process of the job `jax.distributed.initialize` formed."""
        state = distributed.global_state
        return cls(state.client, state.process_id, state.num_processes, stale_after, resume_hint)

    def start(self) -> PeerWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and watching (this process failed): the others report it after `stale_after`
        instead of waiting for it in a collective."""
        self._stop.set()
        self._thread.join()

    def finish(self) -> None:
        """This process's work is done: wait, beating and watching, until every peer's is. A peer that
        dies first (one still exporting or saving) is reported here, exit 1, instead of in
        jax.distributed's shutdown barrier, where the service would abort this process; the caller
        shuts down right after, so that the window left for an unreported death is milliseconds."""
        try:
            self.client.wait_at_barrier(f"{PREFIX}/finished", FINISH_TIMEOUT_MS)
        except Exception as e:  # noqa: BLE001  (process 0's service is gone, or it gave up on a dead peer)
            self._let_the_watchdog_report()  # which of them, and exit
            self._exit(f"error: the processes could not finish together ({error_line(e)}); "
                       f"{self.resume_hint()}")
        self.stop()

    def end_after_error(self, error: Exception) -> NoReturn:
        """The main thread stopped on an unexpected error. Wait until a silent peer would have been
        reported (the watchdog then exits with its line); if every peer still beats, the error is this
        process's own: print it and exit 1. Either way past jax.distributed's shutdown barrier, which
        waits for peers that may be waiting for us in a collective."""
        print(f"process {self.me} of {self.count} stopped on {type(error).__name__}; waiting up to "
              f"{self.stale_after:g} s to see whether another process died", file=sys.stderr, flush=True)
        self._let_the_watchdog_report()
        self.stop()
        traceback.print_exception(error)
        self._exit(f"error: process {self.me} of {self.count} failed ({error_line(error)}); "
                   f"{self.resume_hint()}")

    def _let_the_watchdog_report(self) -> None:
        """Wait until a peer silent since before now would have been reported (the report exits)."""
        self._thread.join(self.stale_after + 5 * self.interval)

    def _watch(self) -> None:
        start = time.monotonic()
        beat, seen = 0, {peer: (None, start) for peer in range(self.count)}  # peer -> (last count, since when)
        while not self._stop.wait(self.interval if beat else 0):
            try:
                self.client.key_value_set(f"{PREFIX}/alive/{self.me}", str(beat), allow_overwrite=True)
                alive = dict(self.client.key_value_dir_get(f"{PREFIX}/alive/"))
            except Exception as e:  # noqa: BLE001  (any failure to reach the service means process 0 is gone)
                if not self._stop.is_set():
                    self._fail(0, f"the coordination service no longer answers: {error_line(e)}")
                return
            beat += 1
            now = time.monotonic()
            for peer in range(self.count):
                if peer == self.me:
                    continue
                count = alive.get(f"{PREFIX}/alive/{peer}")
                if count != seen[peer][0]:
                    seen[peer] = (count, now)
                elif now - seen[peer][1] > self.stale_after and not self._stop.is_set():
                    self._fail(peer, f"no heartbeat for over {self.stale_after:g} s")

    def _fail(self, peer: int, why: str) -> None:
        self._exit(f"error: process {peer} of {self.count} stopped responding ({why}); {self.resume_hint()}")

    @staticmethod
    def _exit(line: str) -> NoReturn:
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        # Straight out: a normal exit would run jax.distributed's shutdown barrier, which waits for the
        # dead peer; the main thread may be stuck in a collective that never completes.
        os._exit(1)
