"""Config: YAML + overrides -> typed dataclasses; errors name the key; presets load and match the paper."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deltafm.train.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    find_preset,
    format_config,
    load_config,
    parse_overrides,
    preset_dir,
)

STEPS = ["train.steps=10"]


def test_defaults_need_a_duration_then_validate():
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({})
    cfg = load_config(None, STEPS)
    assert isinstance(cfg, Config) and cfg.train.steps == 10 and cfg.train.total_images is None


def test_overrides_are_parsed_as_yaml_and_coerced_to_the_field_types():
    cfg = load_config(None, STEPS + [
        "optim.lr=3e-4",  # YAML 1.1 reads this as a string; the float field converts it
        "optim.betas=[0.8, 0.95]",
        "optim.grad_clip=null",
        "train.batch_size=32",
        "train.total_images=null",
        "train.precision=bf16",
        "sample.interval=[0.35, 1]",
        "model.kwargs.base_channels=16",
        "model.kwargs.channel_mult=[1, 2]",
        "objective.lam=0",
        "log.tensorboard=false",
        "data.root=/some/where",
    ])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.optim.grad_clip is None
    assert cfg.train.batch_size == 32 and cfg.train.precision == "bf16"
    assert cfg.sample.interval == (0.35, 1.0)
    assert cfg.model.kwargs == {"base_channels": 16, "channel_mult": [1, 2]}
    assert cfg.objective.lam == 0.0 and cfg.log.tensorboard is False
    assert cfg.data.root == "/some/where"


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("optim.lrr=1e-4", "optim.lrr", "optim.lr"),
        ("trian.steps=5", "trian", "train"),
        ("train.step=5", "train.step", "train.steps"),
        ("lr=1e-4", "lr", "optim.lr"),
        ("objective.lamda=0.1", "objective.lamda", "objective.lam"),
    ],
)
def test_unknown_keys_are_errors_that_suggest_the_closest_key(override, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, STEPS + [override])
    msg = str(e.value)
    assert f"unknown config key '{key}'" in msg and f"did you mean '{hint}'" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=ten", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("optim.lr=fast", "optim.lr"),
        ("train.compile=yes please", "train.compile"),
        ("train.compile=1", "train.compile"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("model.kwargs=3", "model.kwargs"),
        ("model.name=[1]", "model.name"),
        ("train.precision=bf61", "train.precision"),
        ("optim.lr=-1", "optim.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("sample.interval=[0.8, 0.2]", "sample.interval"),
        ("train.ema_halflife_images=1000", "train.ema_decay"),  # both EMA modes set
    ],
)
def test_bad_values_are_errors_that_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, STEPS + [override])


def test_literal_error_suggests_the_closest_choice():
    with pytest.raises(ConfigError, match="did you mean 'bf16'"):
        load_config(None, STEPS + ["train.precision=bf61"])


@pytest.mark.parametrize("lam", ["1", "1.0", "1.5", "-0.1", ".nan"])
def test_lambda_outside_zero_one_is_rejected(lam):
    with pytest.raises(ConfigError, match="objective.lam.*0 <= lam < 1"):
        load_config(None, STEPS + [f"objective.lam={lam}"])


def test_lambda_schedule_keys_and_values_are_checked():
    ok = load_config(None, STEPS + ["objective.lam_schedule={kind: linear, start: 0, end: 0.1, duration: 1000}"])
    assert ok.objective.lam_schedule == {"kind": "linear", "start": 0, "end": 0.1, "duration": 1000}
    with pytest.raises(ConfigError, match="objective.lam_schedule.end"):
        load_config(None, STEPS + ["objective.lam_schedule={kind: linear, end: 1.0, duration: 10}"])
    with pytest.raises(ConfigError, match="did you mean 'objective.lam_schedule.duration'"):
        load_config(None, STEPS + ["objective.lam_schedule={kind: linear, durration: 10}"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["optim..lr=1"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, [("optim.lr.x", 2)])


def test_dry_run_text_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(None, STEPS + ["model.kwargs.channel_mult=[1, 2]", "sample.interval=[0.3, 1.0]"])
    text = format_config(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert diff_configs(cfg, again) == []
    changed = load_config(path, ["optim.lr=0.5"])
    assert diff_configs(cfg, changed) == [("optim.lr", cfg.optim.lr, 0.5)]


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  steps: 3\n  bacth_size: 8\n")
    with pytest.raises(ConfigError, match="train.bacth_size.*did you mean 'train.batch_size'"):
        load_config(typo)


PRESETS = sorted(p.stem for p in preset_dir().glob("*.yaml"))


def test_required_presets_exist():
    for name in ["fmnist-unet-deltafm", "fmnist-unet-fm", "fmnist-sit", "digits-tiny"]:
        assert name in PRESETS
    imagenet = [p for p in PRESETS if p.startswith("imagenet") and "repa" not in p]
    assert len(imagenet) == 8, imagenet  # SiT-B/2, SiT-XL/2 x 256, 512 x FM, ΔFM
    repa = [p for p in PRESETS if p.startswith("imagenet") and "repa" in p]
    assert len(repa) == 4, repa  # REPA-SiT-B/2, REPA-SiT-XL/2 at 256 x FM, ΔFM


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    cfg = load_config(find_preset(name))
    assert cfg.objective.lam in (0.0, 0.05)
    raw = yaml.safe_load(Path(find_preset(name)).read_text())
    assert raw["model"]["name"] == cfg.model.name


def test_imagenet_presets_follow_the_paper():
    seen = set()
    for name in PRESETS:
        if not name.startswith("imagenet"):
            continue
        cfg = load_config(find_preset(name))
        assert cfg.data.name == "latents"
        assert cfg.model.name in ("SiT-B/2", "SiT-XL/2")
        assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and cfg.optim.grad_clip == 1.0
        assert cfg.train.batch_size == 256 and cfg.train.ema_decay == 0.9999
        assert cfg.objective.label_dropout == 0.1 and cfg.objective.path == "linear"
        assert cfg.objective.time_sampler == "uniform" and cfg.objective.negatives == "uniform"
        assert cfg.objective.lam == (0.05 if name.endswith("deltafm") else 0.0)
        if "repa" in name:  # the reference's REPA recipe: DINOv2 tokens, coeff 0.5, projector 2048, REPA's depths
            r = cfg.repa
            assert r.enabled and r.proj_coeff == 0.5 and r.projector_dim == 2048
            assert r.encoder_depth == (4 if cfg.model.name == "SiT-B/2" else 8)
        seen.add((cfg.model.name, "512" in name, cfg.objective.lam, cfg.repa.enabled))
    assert len(seen) == 12


def test_unknown_preset_lists_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'digits-tiny'"):
        find_preset("digits-tiny2")
