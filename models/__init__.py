"""Model definitions with the original checkpoints' module names."""
