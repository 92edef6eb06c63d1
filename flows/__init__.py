"""lensflow flows."""
