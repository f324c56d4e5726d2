"""One module per `codellama` subcommand (registered in codellama.cli.COMMANDS)."""
