"""Thin entry points of the console scripts: parse, call one pipeline function, print. Nothing imports this package."""
