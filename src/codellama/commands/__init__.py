"""One module per `codellama` subcommand; cli.COMMANDS maps command names to them."""
