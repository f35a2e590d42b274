"""Figures, rtda-compare and the notebooks helpers: reading finished runs, never training."""
