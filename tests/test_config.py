"""Training configs: strict keys and types, --set coercion, precedence, shipped presets, resume-safe keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kit.config import (
    RESUME_SAFE_KEYS,
    TrainConfig,
    config_changes,
    from_dict,
    list_presets,
    load_config,
    parse_overrides,
    to_dict,
)
from kit.errors import KitError


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_with_unknown_key_and_wrong_type_names_every_problem_at_once(tmp_path):
    path = write_yaml(tmp_path / "my.yaml", "model: resnet18\nlrr: 0.1\nepochs: many\ncolor_jitter: yes please\n")
    with pytest.raises(KitError) as e:
        load_config(str(path))
    message = str(e.value)
    assert f"{path}: unknown key 'lrr'" in message
    assert f"{path}: 'epochs' must be int, got 'many'" in message
    assert f"{path}: 'color_jitter' must be float" in message
    assert "\n" not in message  # one line, as the CLI prints it


def test_set_and_file_problems_are_collected_into_one_message():
    with pytest.raises(KitError) as e:
        load_config("tiny", overrides=["epochs=2.5", "vlm.lora_r=eight", "vlm.nope=1", "deterministic=maybe"])
    message = str(e.value)
    for named in ("'epochs'", "'vlm.lora_r'", "unknown key 'vlm.nope'", "'deterministic'"):
        assert f"--set: {named}" in message  # named with the source it came from, not the preset
    assert "preset tiny" not in message
    assert message.count(";") == 3


def test_set_values_are_coerced_to_the_field_types():
    cfg = load_config(
        None,
        overrides=[
            "lr=1e-3",
            "epochs=3",
            "deterministic=true",
            "cache=false",
            "tta=none,hflip",
            "mean=[0.5, 0.4, 0.3]",
            "vlm.lora_r=8",
            "vlm.target_modules=q_proj,v_proj",
            "pretrained=/weights/my model.safetensors",
        ],
    )
    assert cfg.lr == 0.001 and type(cfg.lr) is float
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.deterministic is True and cfg.cache is False
    assert cfg.tta == ["none", "hflip"]
    assert cfg.mean == [0.5, 0.4, 0.3]
    assert cfg.vlm.lora_r == 8 and type(cfg.vlm.lora_r) is int
    assert cfg.vlm.target_modules == ["q_proj", "v_proj"]
    assert cfg.vlm.lora_alpha == 32  # a nested override leaves its siblings at their defaults
    assert cfg.pretrained == "/weights/my model.safetensors"


def test_integer_in_a_float_field_becomes_float(tmp_path):
    cfg = load_config(str(write_yaml(tmp_path / "c.yaml", "lr: 1\nwarmup_epochs: 2\n")))
    assert type(cfg.lr) is float and cfg.lr == 1.0
    assert type(cfg.warmup_epochs) is float


def test_bool_is_not_accepted_as_a_number(tmp_path):
    with pytest.raises(KitError, match="'epochs' must be int, got True"):
        load_config(str(write_yaml(tmp_path / "c.yaml", "epochs: true\n")))
    with pytest.raises(KitError, match="--set: 'epochs' must be int, got 'true'"):
        load_config(None, overrides=["epochs=true"])


def test_parse_overrides_nests_dotted_keys_and_refuses_pairs_without_equals():
    assert parse_overrides(["vlm.lora_r=8", "vlm.top_k=3", "lr=0.1"]) == {
        "vlm": {"lora_r": "8", "top_k": "3"},
        "lr": "0.1",
    }
    with pytest.raises(KitError, match="'epochs': expected key=value"):
        parse_overrides(["epochs"])


def test_precedence_defaults_preset_flags_set():
    assert load_config(None).epochs == TrainConfig().epochs
    assert load_config("tiny").epochs == 2
    assert load_config("tiny", quick={"epochs": 3, "lr": None}).epochs == 3
    cfg = load_config("tiny", overrides=["epochs=5"], quick={"epochs": 3, "lr": None})
    assert cfg.epochs == 5
    assert cfg.lr == 0.003  # a flag left unset (None) does not override the preset


def test_validation_problems_are_reported_together_with_their_sources(tmp_path):
    with pytest.raises(KitError) as e:
        load_config(None, overrides=["epochs=0", "lr=0", "tta=none,rot45", "rrc_scale=0.5,0.2"])
    message = str(e.value)
    for expected in ("epochs must be >= 1", "lr must be > 0", "tta items", "rrc_scale"):
        assert f"defaults + --set: {expected}" in message
    path = write_yaml(tmp_path / "c.yaml", "epochs: 0\n")
    with pytest.raises(KitError, match=f"^{re.escape(str(path))}: epochs must be >= 1$"):
        load_config(str(path), quick={"lr": None})
    with pytest.raises(KitError, match=f"^{re.escape('preset tiny + flags')}: epochs must be >= 1$"):
        load_config("tiny", quick={"epochs": 0})


def test_run_names_default_from_the_model_and_size():
    assert load_config(None).name == "resnet18"
    assert load_config(None, quick={"model": "test_efficientnet", "img_size": 32}).name == "test_efficientnet_32"
    assert load_config("tiny").name == "tiny"
    assert load_config("tiny", quick={"name": "mine"}).name == "mine"


def test_missing_preset_or_file_and_bad_yaml_are_named(tmp_path):
    with pytest.raises(KitError, match=r"nope: no such preset \(presets: .*tiny"):
        load_config("nope")
    with pytest.raises(KitError, match="config file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(KitError, match="not valid YAML"):
        load_config(str(write_yaml(tmp_path / "bad.yaml", "model: [unclosed\n")))
    with pytest.raises(KitError, match="expected a mapping"):
        load_config(str(write_yaml(tmp_path / "list.yaml", "- a\n- b\n")))


def test_shipped_presets_include_the_demo_and_test_presets():
    presets = list_presets()
    assert {"tiny", "efficientnet_lite0"} <= set(presets)
    assert len(presets) >= 5


@pytest.mark.parametrize("preset", list_presets())
def test_each_shipped_preset_loads_validates_and_names_a_real_timm_model(preset):
    import timm

    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.family == "timm"
    assert timm.is_model(cfg.model), cfg.model
    if cfg.pretrained == "hub":  # the tag must exist, or the first online run fails
        assert cfg.model in timm.list_pretrained(), cfg.model
    else:
        assert cfg.pretrained in ("", "package:efficientnet_lite0")
    assert cfg.img_size > 0 and cfg.epochs >= 1
    assert from_dict(to_dict(cfg)) == cfg


def test_to_dict_from_dict_round_trip_and_strictness():
    cfg = load_config("efficientnet_lite0", overrides=["vlm.lora_r=4", "tta=none"])
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(KitError, match=re.escape("config.json: unknown key 'folds_sha256'")):
        from_dict({**to_dict(cfg), "folds_sha256": "abc"})


def test_config_changes_ignores_resume_safe_keys():
    assert {"workers", "device", "cache"} <= RESUME_SAFE_KEYS
    old = to_dict(load_config("tiny"))
    safe = to_dict(load_config("tiny", overrides=["workers=4", "device=cpu", "cache=false", "predict_batch_size=7"]))
    assert config_changes(old, safe) == []
    changed = to_dict(load_config("tiny", overrides=["epochs=3", "vlm.lora_r=4", "workers=2"]))
    assert config_changes(old, changed) == ["epochs: 2 -> 3", "vlm.lora_r: 16 -> 4"]
