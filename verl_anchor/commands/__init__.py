"""One module per `verl-anchor` sub-command (`cli.COMMANDS`): each has `configure_parser(parser)` and
`run(args) -> int`, and only calls the library."""
