"""sclabel-dist: distributed pretraining of single-cell foundation models and cell-type annotation."""

__version__ = "0.1.0"
