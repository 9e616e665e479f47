"""Subcommands of `ztagent`, one module per role (see cli.main)."""
