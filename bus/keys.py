"""``bus-keys``: generate CURVE key pairs for the coordinator and its clients.

    bus-keys keys/ coordinator          # keys/coordinator.key, keys/coordinator.key_secret
    bus-keys keys/allowed agent-host-1  # the coordinator allows every *.key in keys/allowed
    bus-keys --agents 'host1-*' keys/allowed host1   # a key that may register only ids host1-*
"""

from __future__ import annotations

import click

from agentbus_zmq.bus.config import version_option
from agentbus_zmq.bus.security import generate


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@version_option()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("names", nargs=-1, required=True)
@click.option("--agents", "patterns", multiple=True, metavar="PATTERN",
              help="An agent id pattern (fnmatch: host1-*) the key may register; repeat for more. "
                   "The coordinator enforces it when the .key is in its allow-list. Default: any id.")
def cli(directory, names, patterns):
    """Write NAME.key (public: share it) and NAME.key_secret (private) in DIRECTORY."""
    for name in names:
        try:
            public, secret = generate(directory, name, patterns)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        click.echo(f"{public}  (public)\n{secret}  (secret, mode 600)")


def main() -> None:
    cli.main(prog_name="bus-keys")


if __name__ == "__main__":
    main()
