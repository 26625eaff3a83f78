"""flock locks that live exactly as long as the process that took them: a forked child (a
DataLoader worker) would otherwise share the parent's lock and keep it after a kill -9 of the
parent until the workers die too (seconds). Used by the run-folder lock (runs/folder.py) and the
gallery index lock (gallery/index.py)."""

import os

HELD = set()  # descriptors of the flock locks this process holds


def _drop_locks_in_child():
    """The child points its copies of the lock descriptors at /dev/null: it drops its reference
    to the locked file while the descriptor numbers stay valid."""
    if not HELD:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in list(HELD):
        os.dup2(null, fd)
    os.close(null)
    HELD.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)
