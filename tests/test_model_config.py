"""Model config validation, serialisation, and the shape presets in configs/models/."""

import math
import os

import jax
import pytest

from jaxgen.models import Model, ModelConfig
from tests.helpers import TINY_GEMMA3

PRESETS = os.path.join(os.path.dirname(__file__), "..", "configs", "models")


@pytest.mark.parametrize("name,params_billion", [("llama-3-8b", 8.03), ("llama-3.2-1b", 1.236),
                                                ("gemma3-270m", 0.268)])
def test_presets_have_the_published_parameter_counts(name, params_billion):
    cfg = ModelConfig.from_json_file(os.path.join(PRESETS, f"{name}.json"))
    model = Model(cfg)  # abstract: nothing is allocated
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(model.abstract_params))
    assert abs(count / 1e9 - params_billion) < 0.01


def test_round_trip_and_layer_pattern():
    assert ModelConfig.from_dict(TINY_GEMMA3.to_dict()) == TINY_GEMMA3
    cfg = TINY_GEMMA3.replace(num_layers=12, sliding_window_pattern=6)
    assert [cfg.is_sliding(i) for i in range(12)] == ([True] * 5 + [False]) * 2
    assert cfg.layer_rope_theta(0) == 1e4 and cfg.layer_rope_theta(5) == 1e6


@pytest.mark.parametrize("changes,message", [
    (dict(architecture="gpt2"), "architecture='gpt2': must be one of"),
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6: must be a multiple of num_kv_heads=4"),
    (dict(hidden_size=0), "hidden_size=0: must be >= 1"),
    (dict(dtype="int8"), "dtype='int8'"),
])
def test_invalid_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY_GEMMA3.replace(**changes)


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match=r"unknown fields \['n_layer'\]"):
        ModelConfig.from_dict({**TINY_GEMMA3.to_dict(), "n_layer": 3})
