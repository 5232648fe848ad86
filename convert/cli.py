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
from convert.predictors_cli import profile_cmd, train_predictors_cmd  # noqa: E402
main_group.add_command(profile_cmd)
main_group.add_command(train_predictors_cmd)
from convert.prosparse_cli import eval_cmd, prosparse_cmd  # noqa: E402
main_group.add_command(prosparse_cmd)
main_group.add_command(eval_cmd)
from convert.pack_cli import all_cmd, pack_cmd  # noqa: E402
main_group.add_command(pack_cmd)
main_group.add_command(all_cmd)
