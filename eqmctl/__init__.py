"""eqmctl: the command line over the `eqm` library (thin: parsing, rich output, exit codes)."""
