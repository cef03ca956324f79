"""Subcommands of this area (registered by specdrift.cli)."""


def register(subparsers) -> None:
    """No commands yet."""
