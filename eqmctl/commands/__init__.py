"""One module per eqmctl subcommand."""
