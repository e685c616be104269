"""The `cxrkeras` command line: options → config → one library call; heavy imports happen inside commands."""

import sys

import click

from cxrkeras import __version__
from cxrkeras.errors import CxrError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CxrError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxrkeras")
def cli():
    """Chest X-ray classification with LKA attention (NIH ChestX-ray14), Keras 3 / TensorFlow."""


# --- commands (each: options -> config -> one library call) ---


def main(argv=None):
    return cli.main(args=argv, prog_name="cxrkeras")


if __name__ == "__main__":
    sys.exit(main())
