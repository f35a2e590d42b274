"""Run infrastructure: errors (a leaf), config and resolvers, launchers, DDP, checkpoints, files, loggers, callbacks, results."""
