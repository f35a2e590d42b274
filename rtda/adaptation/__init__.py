"""Training modules: the core every method stands on (``base.TrainingModule``), source-only segmentation
(``segmentation.SegmentationModule``), the operations several methods share, and one file per method."""
