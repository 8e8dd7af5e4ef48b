"""Forward (noising) processes (pure torch)."""
