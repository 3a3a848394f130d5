"""One way for every entry point to end: a result, one line naming the problem (exit 2), or an interrupt (130/143).

``sys.exit(run_cli(main_fn, argv_debug))`` wraps the body of a command-line program:

* ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``KeyError`` / ``OSError`` (bad input: a flag,
  a file, a key, a shape) -> ``error: <message>`` on stderr, exit 2, no traceback (unless ``debug``);
* extra exception types mapped to their own exit code (``codes={NonFiniteError: 3}``);
* SIGINT -> exit 130 and SIGTERM -> exit 143, each with one line; callers write outputs atomically (temporary
  name, then rename), so an interrupt leaves no partial file. An interrupt raised where Python cannot propagate it
  (a garbage-collector callback such as JAX's, a ``__del__``: "Exception ignored in ...") is not lost: the
  unraisable hook delivers it again to the main program (``_thread.interrupt_main`` from a timer
  thread, 0.1 s later). Library code that catches every exception (orbax's ``CheckpointManager.wait_until_finished``
  logs and drops anything raised while it joins its save thread, a ``KeyboardInterrupt`` included) runs inside
  :func:`hold_interrupts`: a signal arriving there is delivered again when the block ends.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (a KeyboardInterrupt, so every ``finally`` cleans up)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _redeliver_interrupts(previous_hook):
    """An unraisable hook: a swallowed KeyboardInterrupt/Terminated is raised again in the main thread."""
    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, KeyboardInterrupt):     # from another thread: the main thread sees it in its own code
            signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            t = threading.Timer(0.1, _thread.interrupt_main, args=(signum,))    # after this hook has returned
            t.daemon = True
            t.start()
            return
        previous_hook(unraisable)

    return hook


@contextlib.contextmanager
def hold_interrupts() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside the block are held and raised again (``signal.raise_signal``, to the handlers
    in place before) when it ends, so code that swallows every exception cannot lose them; outside the main
    thread (where Python runs no handlers) a no-op. The block should be bounded (a wait for a checkpoint save):
    the interrupt takes effect when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum, frame):
        held.append(signum)

    for s in previous:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])


def error_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return f"error: {msg or type(e).__name__}"


def run_cli(main: Callable[[], int | None], *, debug: bool = False,
            codes: Mapping[type[BaseException], int] | None = None, name: str = "") -> int:
    """Run ``main()`` and turn its outcome into an exit code (module docstring). Returns, never exits."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_interrupts(previous_hook)
    prefix = f"{name}: " if name else ""
    try:
        rc = main()
        return 0 if rc is None else int(rc)
    except Terminated:
        print(f"{prefix}terminated; no output written", file=sys.stderr, flush=True)
        return 143
    except KeyboardInterrupt:
        print(f"{prefix}interrupted; no output written", file=sys.stderr, flush=True)
        return 130
    except BaseException as e:
        for tp, code in (codes or {}).items():
            if isinstance(e, tp):
                if debug:
                    raise
                print(f"{prefix}{error_line(e)}", file=sys.stderr, flush=True)
                return code
        if isinstance(e, BAD_INPUT) and not debug:
            print(f"{prefix}{error_line(e)}", file=sys.stderr, flush=True)
            return 2
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def exit_process(code: int) -> None:
    """Leave with ``code``. After an interrupt (130/143) the process ends at once (``os._exit`` after flushing):
    tearing the interpreter down while XLA's threads still run can crash (a segfault instead of the exit code).
    Otherwise the work is done (or failed with its message): SIGINT/SIGTERM are ignored from here on, the other
    non-daemon threads are joined and the ``atexit`` handlers run (log flushing, ``jax.distributed`` shutdown,
    ``weakref.finalize`` clean-ups) as at a normal exit, and the process ends with ``os._exit``: the rest of the
    interpreter's teardown (destroying the XLA client and every module: over a second after a training run, with
    signals ignored, and a known place for crashes) is skipped; every file was closed by the program."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code in (130, 143):
        os._exit(code)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def guard_imports(name: str = "") -> None:
    """Before an entry point's heavy imports: SIGINT/SIGTERM end the process at once with one line (nothing can
    have been written yet). :func:`run_cli` replaces these handlers."""
    prefix = f"{name}: " if name else ""

    def leave(signum, frame):
        term = signum == signal.SIGTERM
        print(f"{prefix}{'terminated' if term else 'interrupted'}; no output written", file=sys.stderr, flush=True)
        os._exit(143 if term else 130)

    signal.signal(signal.SIGINT, leave)
    signal.signal(signal.SIGTERM, leave)

