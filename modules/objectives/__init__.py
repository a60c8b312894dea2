"""objectives methods."""
