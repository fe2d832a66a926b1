"""One module per `darkhorse` subcommand: argument definitions plus a thin `run`."""
