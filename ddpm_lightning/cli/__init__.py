"""Command-line entry points (the only place with @hydra.main / argparse)."""
