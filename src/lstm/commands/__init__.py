"""Subcommands of the `lstm` command line."""
