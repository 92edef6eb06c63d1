"""lensflow scoring."""
