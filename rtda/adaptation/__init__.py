"""One LightningModule per adaptation method; ``base.SegmentationModule`` is source-only training."""
