"""User-facing errors, output directories and interruption, shared by `hybrid-run` and `hybrid-convert`.

A `UserError` is a problem with what the user gave us (a path, a flag, a file's contents).
It is printed as one line and the process exits with code 2; the traceback is shown only
with `--debug`.

Outputs never touch inputs: `check_output_path` refuses an output that equals, contains or lies
inside any input, and `prepare_output_dir` marks each directory this product writes
(`OUTPUT_MARKER`), so that `--force` replaces only directories that carry the mark. A directory
made by a command that then fails before writing anything is removed again.

Long jobs stop cleanly: inside `GracefulStop`, the first Ctrl-C or SIGTERM only asks the job to stop;
it checkpoints at its next safe point and raises KeyboardInterrupt; a second one stops at once.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import click

OUTPUT_MARKER = ".hybrid-runtime-output"
_MARKER_TEXT = "written by hybrid-runtime: `--force` may replace this directory\n"
_created_outputs: list[Path] = []   # directories made by this process (removed again if left empty)


def log(msg: str) -> None:
    """A log line on stderr (stdout is for the product's output, e.g. generated text)."""
    print(msg, file=sys.stderr, flush=True)


class UserError(Exception):
    """Bad input: shown to the user as a single line, exit code 2."""


def _terminate(signum, frame):
    raise KeyboardInterrupt


def console_main(group: click.Group) -> None:
    """Run a click group; turn UserError (and any unexpected error) into one line on stderr."""
    debug = "--debug" in sys.argv[1:]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)   # SIGTERM stops like Ctrl-C: jobs checkpoint first
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):   # click turns Ctrl-C into Abort
        remove_unused_outputs()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:  # usage errors: bad option, missing argument: one line too
        remove_unused_outputs()
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except UserError as e:
        remove_unused_outputs()
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a bug of ours, not bad input: still one line unless --debug
        remove_unused_outputs()
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: internal {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- checked values

def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """UserError unless `value` is a finite number within the bounds (open or closed)."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UserError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise UserError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


# ----------------------------------------------------------------------------- outputs

def path_relation(out: Path, inp: Path) -> str | None:
    """How resolved path `out` relates to `inp`: "is", "contains", "lies inside", or None."""
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "lies inside"
    return None


def check_output_path(path: str | os.PathLike, inputs=(), what: str = "--out", kind: str = "dir") -> Path:
    """An output path that is safe to write: not an input, not containing one, not inside one, and
    (kind "dir") not an existing file / (kind "file") not an existing directory, under a directory.

    inputs: (name, path) pairs, e.g. ("--model", "./m"); None paths are skipped."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    for name, p in inputs:
        if p is None:
            continue
        rel = path_relation(resolved, Path(p).expanduser().resolve())
        if rel:
            raise UserError(f"{what} {out} {rel} the input {name} {p}: an output never replaces or writes into "
                            "an input; choose another output")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise UserError(f"{what} {out}: exists and is not a directory")
    if kind == "file" and out.is_dir():
        raise UserError(f"{what} {out}: is a directory, expected a file name")
    parent = resolved if kind == "dir" else resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{what} {out}: {parent} is not writable")
    return out


def prepare_output_dir(path: str | os.PathLike, force: bool, inputs=(), what: str = "--out") -> Path:
    """Create an output directory and mark it as this product's. A non-empty one is refused unless
    `force`, and `force` replaces only a directory this product wrote (it carries OUTPUT_MARKER)."""
    out = check_output_path(path, inputs, what)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: output directory exists and is not empty (use --force to overwrite)")
        if not (out / OUTPUT_MARKER).is_file():
            raise UserError(f"{out}: not empty and not written by this product (no {OUTPUT_MARKER}); --force only "
                            "replaces this product's own output directories: choose another output")
        shutil.rmtree(out)
    if not out.exists():
        _created_outputs.append(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text(_MARKER_TEXT)
    return out


def mark_output_dir(out: Path) -> None:
    """Mark a directory made elsewhere (e.g. a resumed job's) as this product's."""
    (out / OUTPUT_MARKER).write_text(_MARKER_TEXT)


def remove_unused_outputs() -> None:
    """Remove the directories this process created that still hold nothing but the marker (an error
    before any work was written must not leave an empty output folder behind)."""
    while _created_outputs:
        out = _created_outputs.pop()
        try:
            if out.is_dir() and all(p.name == OUTPUT_MARKER for p in out.iterdir()):
                shutil.rmtree(out)
        except OSError:
            pass


# ----------------------------------------------------------------------------- interruption

class GracefulStop:
    """`with GracefulStop() as stop:` — the first Ctrl-C / SIGTERM sets `stop.requested` (the job checks
    it at its safe points, checkpoints and raises KeyboardInterrupt); a second one interrupts at once.
    Outside the main thread (signals cannot be caught there) it does nothing."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("stopping at the next checkpoint (press Ctrl-C again to stop at once)")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
