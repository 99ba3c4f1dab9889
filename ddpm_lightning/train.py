"""``python -m ddpm_lightning.train`` is ``ddpm-train``."""

from .cli.train import main

if __name__ == "__main__":
    main()
