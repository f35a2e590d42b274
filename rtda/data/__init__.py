"""Datasets (real on-disk formats), the built-in demo pair, transforms and the DataModule."""
