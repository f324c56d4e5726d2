"""One module per `codellama` subcommand (see cli.COMMANDS)."""
