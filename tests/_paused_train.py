"""train.py with a pause at one moment of the checkpoint path, for the SIGKILL tests (a fault
injection that stays out of the training code):

    EDITX_PAUSE_AT=save:<step>   inside the save of <step>: every file written into Orbax's temporary
                                 folder, before the rename that commits it
    EDITX_PAUSE_AT=prune         inside the deletion of a pruned step folder, half of its files gone
    EDITX_PAUSE_FILE=<path>      touched once paused, so the test knows when to kill
"""

import os
import pathlib
import sys
import time

from orbax.checkpoint._src.path import atomicity

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train
from editx_jax.train import loop

WHERE = os.environ["EDITX_PAUSE_AT"]
MARKER = pathlib.Path(os.environ["EDITX_PAUSE_FILE"])


def pause():
    MARKER.touch()
    time.sleep(600)  # until the test kills this process


if WHERE.startswith("save:"):
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def paused_finalize(self):
        if self.get_final().name == WHERE.split(":")[1]:
            pause()
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = paused_finalize

elif WHERE == "prune":
    purge = loop.purge_trash

    def paused_purge(path, **kw):
        files = sorted(p for p in (pathlib.Path(path) / loop.TRASH).rglob("*") if p.is_file())
        if files:
            for f in files[::2]:
                f.unlink()
            pause()
        purge(path, **kw)

    loop.purge_trash = paused_purge

if __name__ == "__main__":
    sys.exit(train.main())
