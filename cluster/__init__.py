"""The conductor: config, placement on a Ray cluster, the training driver and the CLI."""
