"""One way for every entry point to end: a result, one line naming the problem (exit 2), or an interrupt (130/143).

``sys.exit(run_cli(main_fn, argv_debug))`` wraps the body of a command-line program:

* ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``KeyError`` / ``OSError`` (bad input: a flag,
  a file, a key, a shape) -> ``error: <message>`` on stderr, exit 2, no traceback (unless ``debug``);
* extra exception types mapped to their own exit code (``codes={NonFiniteError: 3}``);
* SIGINT -> exit 130 and SIGTERM -> exit 143, each with one line; callers write outputs atomically (temporary
  name, then rename), so an interrupt leaves no partial file. An interrupt raised where Python cannot propagate it
  (a garbage-collector callback such as JAX's, a ``__del__``: "Exception ignored in ...") is not lost: the
  unraisable hook delivers it again to the main program (``_thread.interrupt_main`` from a timer
  thread, 0.1 s later).
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping

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
    Otherwise the work is done (or failed with its message): SIGINT/SIGTERM are ignored from here on, so a signal
    during the interpreter's teardown (which resets Python's handlers to the default: death by the signal, exit
    -2/-15) cannot turn a finished run into a crash."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code in (130, 143):
        os._exit(code)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


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

