"""Subcommands of `ztagent`, one module per role (see agent.cli)."""
