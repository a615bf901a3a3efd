"""The multi-host watchdog on a fake key-value store, one process: when the main thread stops on an
error it names the dead peer if there is one, otherwise its own error, and exits 1 either way
(past jax.distributed's shutdown barrier: os._exit, so each case runs in a child process)."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from editx_jax.train.peers import PREFIX, PeerWatchdog

    class Store:  # the two calls the watchdog makes on jax's distributed client
        def __init__(self):
            self.kv = {}
        def key_value_set(self, key, value, allow_overwrite=False):
            self.kv[key] = value
        def key_value_dir_get(self, prefix):
            return [(k, v) for k, v in list(self.kv.items()) if k.startswith(prefix)]

    store = Store()
    if sys.argv[1] == "alive":  # process 1 keeps beating
        def beat():
            n = 0
            while True:
                store.key_value_set(f"{PREFIX}/alive/1", str(n), allow_overwrite=True)
                n, _ = n + 1, time.sleep(0.05)
        threading.Thread(target=beat, daemon=True).start()
    else:  # process 1 beat once, then died
        store.key_value_set(f"{PREFIX}/alive/1", "0")
    dog = PeerWatchdog(store, 0, 2, 0.5, lambda: "resume from RUN", interval=0.05).start()
    try:
        raise RuntimeError("Gloo all-reduce failed: Connection reset by peer")
    except Exception as e:
        dog.end_after_error(e)
    print("unreachable")
""")


def _run(peer):
    return subprocess.run([sys.executable, "-c", SCRIPT, peer], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, timeout=60)


@pytest.mark.parametrize("peer, line", [
    ("dead", "error: process 1 of 2 stopped responding (no heartbeat for over 0.5 s); resume from RUN"),
    ("alive", "error: process 0 of 2 failed (RuntimeError: Gloo all-reduce failed: Connection reset by peer); "
              "resume from RUN"),
])
def test_an_error_in_the_main_thread_names_the_dead_peer_or_itself(peer, line):
    run = _run(peer)
    assert run.returncode == 1, run.stderr
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("error:")] == [line], run.stderr
    assert "unreachable" not in run.stdout
    # Its own error keeps its traceback; a dead peer's broken collective is only the symptom.
    assert ("Traceback" in run.stderr) == (peer == "alive"), run.stderr
