"""The `ztagent` command line: one subcommand per role, each a module in cli.commands."""
