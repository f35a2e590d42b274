"""One function per command (train, evaluate, pseudo-labels, translate), each returning a dict: what the console scripts, tests and notebooks call."""
