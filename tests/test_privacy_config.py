"""PrivacyConfig validation (errors name the field) and the `fedscope train` privacy flags."""

from __future__ import annotations

import argparse

import pytest

from fedscope_jax.errors import FedscopeError
from fedscope_jax.cli.flags import add_privacy_arguments, privacy_config_from_args as config_from_args
from fedscope_jax.privacy.config import PrivacyConfig


def test_defaults_are_conservative():
    c = PrivacyConfig()
    assert c.mode == "personalized" and c.amplification is False and c.clipping == "fixed"
    assert c.delta == 1e-5 and c.secagg is False


@pytest.mark.parametrize("mapping, match", [
    ({"mode": "local"}, r"privacy\.mode: expected one of personalized, uniform, central, distributed, off"),
    ({"epsilon": -1}, r"privacy\.epsilon: expected a positive"),
    ({"delta": 1.0}, r"privacy\.delta"),
    ({"accountant": "moments"}, r"privacy\.accountant"),
    ({"amplification": "yes"}, r"privacy\.amplification: expected true or false"),
    ({"epsilon": 1.0, "eps_min": 2.0}, r"eps_min <= epsilon"),
    ({"noise": 1.0}, r"privacy\.noise: unknown privacy option"),
    ({"clip_bit_fraction": 1.0}, r"privacy\.clip_bit_fraction"),
])
def test_from_mapping_errors_name_the_field(mapping, match):
    with pytest.raises(FedscopeError, match=match):
        PrivacyConfig.from_mapping(mapping)


def test_from_mapping_and_flags_override():
    base = PrivacyConfig.from_mapping({"mode": "uniform", "epsilon": 3, "accountant": "pld"}, where="run.json:privacy")
    assert base.epsilon == 3.0 and isinstance(base.epsilon, float)
    parser = argparse.ArgumentParser()
    add_privacy_arguments(parser)
    args = parser.parse_args(["--epsilon", "5", "--privacy", "central", "--delta", "1e-6", "--amplification"])
    c = config_from_args(args, base)
    assert (c.mode, c.epsilon, c.delta, c.accountant, c.amplification) == ("central", 5.0, 1e-6, "pld", True)
    assert config_from_args(parser.parse_args([]), base) == base
    with pytest.raises(FedscopeError, match=r"^--delta: expected a number in \(0, 1\), got 2\.0"):
        config_from_args(parser.parse_args(["--delta", "2"]), base)
    # a value from the config file is named by its key, one from a flag by the flag
    adaptive = PrivacyConfig.from_mapping({"clipping": "adaptive"})
    with pytest.raises(FedscopeError, match=r"^privacy\.clipping: the central DP-FedAvg baseline"):
        config_from_args(parser.parse_args(["--privacy", "central"]), adaptive)
    with pytest.raises(FedscopeError, match=r"^--clipping: the central DP-FedAvg baseline"):
        config_from_args(parser.parse_args(["--privacy", "central", "--clipping", "adaptive"]), base)
    assert PrivacyConfig.from_mapping(c.to_dict()) == c
