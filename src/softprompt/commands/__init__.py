"""Layer 9: one module per subcommand, each parsed flags -> `run(args) -> int`."""
