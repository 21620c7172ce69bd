"""Child processes of busbench: started through the operators' entry points, watched,
and always reaped -- on success, on error, on Ctrl-C and when busbench itself dies
(children ask the kernel to SIGTERM them when busbench goes: PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

import psutil

__all__ = ["Child", "ChildFailed", "stop_all"]

log = logging.getLogger(__name__)


class ChildFailed(RuntimeError):
    """A process busbench started exited while it was still needed."""


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Child:
    """One process started as ``python -m MODULE ARGS`` (the console scripts' code), after
    ``prefix`` where one is given: a command that ends by exec'ing it, such as ``ip netns
    exec NS`` (busbench.netlab), so that the pid is still the Python process's."""

    def __init__(self, name: str, module: str, args: list[str], log_path: str | os.PathLike | None = None,
                 prefix: tuple[str, ...] = ()):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self._terminated = False
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-P", "-m", module, *args],  # prefix: e.g. ip netns exec NS (it execs)
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            preexec_fn=die_with_parent, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            where = f"; its log: {self.log_path}" if self.log_path else ""
            raise ChildFailed(f"{self.name} (pid {self.pid}) exited early with status {code}{where}")

    def processes(self) -> list[psutil.Process]:
        """This process and its descendants (the forked agents of a launcher)."""
        try:
            p = psutil.Process(self.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def terminate(self) -> None:
        """SIGTERM, once, if it is still running (:meth:`stop` waits for it)."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the whole group.  Returns the status."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", self.name, timeout)
        # Whatever is left in its session (orphaned agents, say) goes too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self.proc.wait(max(timeout, 5.0))  # SIGKILLed: it goes at once, however short the grace
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return code


def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    """Stop ``children`` together: SIGTERM to every one first, then each waited for until
    one shared deadline (``timeout`` s in all, not each), then SIGKILL what is left.  An
    interrupted busbench is gone in ``timeout`` s however loaded the machine is."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.stop(max(0.1, deadline - time.monotonic()))
