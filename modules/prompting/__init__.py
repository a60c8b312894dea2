"""prompting methods."""
