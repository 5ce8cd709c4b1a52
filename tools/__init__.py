"""Command-line tools; importable so tests call their `main` directly."""
