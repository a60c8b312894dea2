"""token_level methods."""
