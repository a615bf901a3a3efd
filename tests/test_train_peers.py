"""The multi-host watchdog on a fake key-value store, one process. When the main thread stops on an
error it names the dead peer if there is one, otherwise its own error; when it finishes it waits for
every peer to finish and names one that dies first. A failure exits 1 past jax.distributed's shutdown
barrier (os._exit), so each case runs in a child process."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from editx_jax.train.peers import PREFIX, PeerWatchdog

    class Store:  # the calls the watchdog makes on jax's distributed client, for process 0 of 2
        def __init__(self):
            self.kv, self.peer_finished = {}, threading.Event()
        def key_value_set(self, key, value, allow_overwrite=False):
            self.kv[key] = value
        def key_value_dir_get(self, prefix):
            return [(k, v) for k, v in list(self.kv.items()) if k.startswith(prefix)]
        def wait_at_barrier(self, name, timeout_ms):
            self.peer_finished.wait()

    peer, main = sys.argv[1:]
    store = Store()
    def process_1():  # beats for 0.3 s, then (dead) stops, (done) reaches the barrier, (alive) beats on
        for n in range(10**6):
            if n == 6 and peer != "alive":
                if peer == "done":
                    store.peer_finished.set()
                return
            store.key_value_set(f"{PREFIX}/alive/1", str(n), allow_overwrite=True)
            time.sleep(0.05)
    beater = threading.Thread(target=process_1, daemon=True)
    beater.start()
    dog = PeerWatchdog(store, 0, 2, 2.0, lambda: "resume from RUN", interval=0.1).start()
    if main == "finish":
        dog.finish()
        print("finished")
        sys.exit(0)
    if peer == "dead":
        beater.join()  # a dead peer's broken collective reaches the main thread after its death
    try:
        raise RuntimeError("Gloo all-reduce failed: Connection reset by peer")
    except Exception as e:
        dog.end_after_error(e)
    print("unreachable")
""")

DEAD = "error: process 1 of 2 stopped responding (no heartbeat for over 2 s); resume from RUN"
OWN = "error: process 0 of 2 failed (RuntimeError: Gloo all-reduce failed: Connection reset by peer); resume from RUN"


@pytest.mark.parametrize("peer, main, code, line", [
    ("dead", "error", 1, DEAD),
    ("alive", "error", 1, OWN),  # its own error, with its traceback
    ("dead", "finish", 1, DEAD),  # a peer that dies before its end is not left to the shutdown barrier
    ("done", "finish", 0, None),
])
def test_the_watchdog_names_who_stopped(peer, main, code, line):
    run = subprocess.run([sys.executable, "-c", SCRIPT, peer, main], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, timeout=60)
    assert run.returncode == code, run.stderr
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("error:")] == ([line] if line else []), run.stderr
    assert run.stdout.strip() == ("finished" if code == 0 else ""), run.stdout
    # Its own error keeps its traceback; a dead peer's broken collective is only the symptom.
    assert ("Traceback" in run.stderr) == (line == OWN), run.stderr
