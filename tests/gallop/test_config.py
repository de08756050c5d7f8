"""GallopConfig: validation and round trip."""

import pytest

from gallop import GallopConfig


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_config_density_range(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        GallopConfig(density=density)


@pytest.mark.parametrize("density", [float("nan"), float("inf"), True, "0.1", None])
def test_config_density_must_be_a_finite_number(density):
    with pytest.raises(ValueError, match=r"density must be a finite real number"):
        GallopConfig(density=density)


def test_config_other_errors():
    with pytest.raises(ValueError, match="scorer must be one of"):
        GallopConfig(scorer="fisher")
    with pytest.raises(ValueError, match="budget must be one of"):
        GallopConfig(budget="layer")
    with pytest.raises(TypeError, match="target_modules must be"):
        GallopConfig(target_modules=[1, 2])
    assert GallopConfig.from_dict(GallopConfig(density=0.5).to_dict()) == GallopConfig(density=0.5)
