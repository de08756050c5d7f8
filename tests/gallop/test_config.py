"""GallopConfig: validation and round trip."""

import pytest

from gallop import GallopConfig


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_config_density_range(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        GallopConfig(density=density)


@pytest.mark.parametrize("density", [float("nan"), float("inf")])
def test_config_density_must_be_a_finite_number(density):
    with pytest.raises(ValueError, match=r"density must be a finite number"):
        GallopConfig(density=density)


@pytest.mark.parametrize("density", [True, "0.1", None])
def test_config_density_must_be_a_real_number(density):
    with pytest.raises(TypeError, match=r"density must be a real number"):
        GallopConfig(density=density)


def test_scalar_mistakes_raise_one_type_everywhere():
    """One set of validators (gallop_kernels.check_real / check_int): a value of the wrong type is a TypeError, a
    wrong value a ValueError, in the config, the optimizer, calibration and the kernels alike."""
    import torch

    import gallop_kernels as gk
    from gallop import SparseAdamW
    from gallop.calibrate import calibration_subset

    delta = torch.zeros(4)
    wrong_type = [
        lambda: GallopConfig(density="0.1"),
        lambda: GallopConfig(eps="1e-8"),
        lambda: GallopConfig(seed=1.5),
        lambda: SparseAdamW([torch.nn.Parameter(delta.clone())], lr="1e-3"),
        lambda: calibration_subset(10, "0.5"),
        lambda: calibration_subset(10.0, 0.5),
        lambda: gk.sparse_adamw_(delta, delta.clone(), delta.clone(), delta.clone(), step=1, lr="1e-3"),
    ]
    for call in wrong_type:
        with pytest.raises(TypeError, match="must be a"):
            call()
    wrong_value = [
        lambda: GallopConfig(density=1.5),
        lambda: GallopConfig(eps=-1.0),
        lambda: GallopConfig(num_selected=0),
        lambda: SparseAdamW([torch.nn.Parameter(delta.clone())], lr=-1.0),
        lambda: calibration_subset(10, 0.0),
        lambda: calibration_subset(0, 0.5),
        lambda: gk.sparse_adamw_(delta, delta.clone(), delta.clone(), delta.clone(), step=1, lr=float("nan")),
    ]
    for call in wrong_value:
        with pytest.raises(ValueError, match="must be"):
            call()


def test_config_other_errors():
    with pytest.raises(ValueError, match="scorer must be one of"):
        GallopConfig(scorer="fisher")
    with pytest.raises(ValueError, match="budget must be one of"):
        GallopConfig(budget="layer")
    with pytest.raises(TypeError, match="target_modules must be"):
        GallopConfig(target_modules=[1, 2])
    assert GallopConfig.from_dict(GallopConfig(density=0.5).to_dict()) == GallopConfig(density=0.5)
