"""Measurements: complexity (params, FLOPs), inference speed, seconds per training iteration, the data pipeline."""
