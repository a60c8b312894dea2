"""sparse methods."""
