"""Segmentation networks as plain ``nn.Module``s (no Lightning): train mode may return auxiliary outputs."""
