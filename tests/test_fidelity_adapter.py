"""torch-fidelity behind one adapter: the installed release is the one it was written for, or one clear error."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from ddpm_lightning.metrics import fidelity_adapter


def test_the_installed_torch_fidelity_is_the_one_the_adapter_was_written_for():
    assert importlib.metadata.version("torch-fidelity") == fidelity_adapter.WRITTEN_FOR
    assert fidelity_adapter.torch_fidelity().__version__ == fidelity_adapter.WRITTEN_FOR


@pytest.mark.parametrize("version", ["0.4.0", "0.4.1"])
def test_a_patch_release_of_the_same_series_is_accepted(version):
    fidelity_adapter.check_version(version)


@pytest.mark.parametrize("version", ["0.3.0", "0.5.0", "1.0.0"])
def test_another_release_fails_naming_both_versions_and_the_fix(version):
    with pytest.raises(RuntimeError, match=rf"^torch-fidelity {version} is installed, but .* written for "
                                           r"torch-fidelity 0\.4\.0 .*: pip install torch-fidelity==0\.4\.0$"):
        fidelity_adapter.check_version(version)


def test_the_inception_is_built_empty_without_a_download_and_filled_strictly(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the adapter must not download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_download)
    net = fidelity_adapter.inception_v3()
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    assert torch.equal(net.fc.weight, torch.full((1008, 2048), 0.5))
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict({"fc.bias": torch.zeros(1008)})
