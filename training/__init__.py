"""lensflow training."""
