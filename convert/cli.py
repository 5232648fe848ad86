"""`hybrid-convert`: the offline conversion stage (ProSparse, eval, profile, predictors, pack)."""
from __future__ import annotations

import click

from hybrid_runtime.errors import console_main


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main_group(debug: bool) -> None:
    """Convert dense LLaMA-family checkpoints into hybrid sparse model directories."""


def main() -> None:
    console_main(main_group)


# Subcommands register themselves below, one line each.
