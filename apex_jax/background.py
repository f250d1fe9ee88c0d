"""Work started in a background thread, for the compiles that overlap host work.

A leaf module (it imports nothing from apex_jax). XLA releases the GIL while it compiles, so
a compile started here runs while the caller's Python goes on; XLA compiles one program at
a time, so programs compile in the order their compiles start.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["in_background"]


def in_background(work: Callable[[], Any], name: str) -> concurrent.futures.Future:
    """Start ``work()`` in a new thread named ``name``; its result (or the exception it
    raised) comes from the returned future.

    Not a daemon thread: a process that exits (after an error, or Ctrl-C) waits for it,
    because a daemon thread still inside XLA's compiler when the interpreter shuts down
    aborts the process instead of letting it exit with its own code.
    """
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as err:  # handed to the caller that waits for it
            future.set_exception(err)

    threading.Thread(target=run, name=name).start()
    return future
