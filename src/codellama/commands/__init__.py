"""CLI subcommands: one module each, exposing `register(subparsers)`; listed in codellama.cli.COMMANDS."""
