"""User-facing errors and the console entry wrapper shared by `hybrid-run` and `hybrid-convert`.

A `UserError` is a problem with what the user gave us (a path, a flag, a file's contents).
It is printed as one line and the process exits with code 2; the traceback is shown only
with `--debug`.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click


def log(msg: str) -> None:
    """A log line on stderr (stdout is for the product's output, e.g. generated text)."""
    print(msg, file=sys.stderr, flush=True)


class UserError(Exception):
    """Bad input: shown to the user as a single line, exit code 2."""


def console_main(group: click.Group) -> None:
    """Run a click group; turn UserError (and any unexpected error) into one line on stderr."""
    debug = "--debug" in sys.argv[1:]
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:  # usage errors: bad option, missing argument
        e.show()
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug of ours, not bad input: still one line unless --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: internal {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)


def prepare_output_dir(path: str | os.PathLike, force: bool) -> Path:
    """Create an output directory; refuse to touch a non-empty one unless `force`."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: output directory exists and is not empty (use --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
