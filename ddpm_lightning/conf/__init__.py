"""Hydra configs shipped inside the package (found through ``pkg://ddpm_lightning.conf``), so a wheel or a
non-editable install has them too."""
