"""Entry points: the control-plane process, cluster wiring, the CLI and its subcommands,
the admin service and the embedded runner. Nothing below imports from here."""
