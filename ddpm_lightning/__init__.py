"""ddpm_lightning: reproduce, ablate and extend ADM / DDPM / Improved DDPM with Lightning and Hydra."""

__version__ = "0.1.0"
