from pathlib import Path

import pytest
import yaml

from tunesmith.config import RunConfig, config_reference_markdown, load_config
from tunesmith.errors import UserError
from tunesmith.starter import support_tickets, write_starter

REPO = Path(__file__).resolve().parent.parent


def test_starter_config_loads_and_is_commented(tmp_path):
    config_path, data_path = write_starter(tmp_path / "proj", count=20)
    text = config_path.read_text()
    assert text.count("# ") > 40  # every key carries its doc
    cfg = load_config(config_path)
    assert cfg.resolve(cfg.data.train) == data_path
    assert cfg.run_dir == tmp_path / "proj" / "run"
    assert len(data_path.read_text().splitlines()) == 20


def test_starter_refuses_to_overwrite(tmp_path):
    write_starter(tmp_path, count=10)
    with pytest.raises(UserError, match="already exists"):
        write_starter(tmp_path, count=10)


def test_generator_is_deterministic():
    assert support_tickets(50, seed=3) == support_tickets(50, seed=3)
    assert support_tickets(50, seed=3) != support_tickets(50, seed=4)


def test_bad_config_lists_every_error_with_key_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"nme": "x"},
                "data": {"eval_fraction": 2.0},
                "train": {"method": "lor", "lora": {"r": 0}, "batch_size": "eight"},
                "surprise": 1,
            }
        )
    )
    with pytest.raises(UserError) as info:
        load_config(path)
    message = info.value.message
    for key in ("model.nme", "data.train", "data.eval_fraction", "train.method", "train.lora.r", "train.batch_size", "surprise"):
        assert f"  {key}:" in message, key
    assert "7 error(s)" in message


def test_overrides_are_typed_and_checked(tmp_path):
    config_path, _ = write_starter(tmp_path, count=10)
    cfg = load_config(config_path, ["train.lora.r=8", "train.method=full", "eval.gates=['accuracy>=0.9']"])
    assert cfg.train.lora.r == 8 and cfg.train.method == "full"
    assert cfg.eval.gates == ["accuracy>=0.9"]
    with pytest.raises(UserError, match="train.lora.rank"):
        load_config(config_path, ["train.lora.rank=8"])
    with pytest.raises(UserError, match="no '='"):
        load_config(config_path, ["train.lora.r"])


def test_invalid_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(RunConfig)


def test_config_reference_doc_is_current():
    doc = REPO / "docs" / "config.md"
    assert doc.read_text() == config_reference_markdown() + "\n", "run: tunesmith config reference > docs/config.md"


def test_shipped_configs_load():
    configs = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "examples").glob("*/config.yaml"))
    assert configs
    for path in configs:
        load_config(path)
