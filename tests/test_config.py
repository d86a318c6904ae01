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
    assert "7 errors in the config" in message


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


@pytest.mark.parametrize("content", [b"\xff\xfe\x00n\x00a\x00m\x00e\x00", None], ids=["utf16", "folder"])
def test_unreadable_config_is_one_line_not_a_traceback(capsys, tmp_path, content):
    path = tmp_path / "config.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, out, err = config_check(capsys, path)
    assert code == 2 and "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "config.yaml" in lines[0] and "fix:" in lines[0], err


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
    configs = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "examples").glob("*/*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


# ---------------------------------------------------------------- settings that cannot run

UNRUNNABLE = [
    ("train.epochs=.inf", "train.epochs"),
    ("train.epochs=.nan", "train.epochs"),
    ("train.epochs=1e9", "train.epochs"),
    ("train.seed=99999999999999999999999", "train.seed"),
    ("train.seed=-1", "train.seed"),
    ("data.split_seed=18446744073709551616", "data.split_seed"),
    ("eval.seed=4294967296", "eval.seed"),
    ("train.lora.target_modules=[]", "train.lora.target_modules"),
    ("train.lora.target_modules=['']", "train.lora.target_modules"),
    ("train.lora.alpha=1e400", "train.lora.alpha"),
    ("train.lora.alpha=1.0e+400", "train.lora.alpha"),
    ("train.lora.alpha=.nan", "train.lora.alpha"),
    ("train.lora.dropout=.nan", "train.lora.dropout"),
    ("train.lora.r=100000", "train.lora.r"),
    ("train.learning_rate=.inf", "train.learning_rate"),
    ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=-3", "train.grad_accum"),
    ("train.max_steps=0", "train.max_steps"),
    ("data.eval_fraction=.nan", "data.eval_fraction"),
    ("data.max_length=100000000", "data.max_length"),
    ("data.train=", "data.train"),
    ("data.train='  '", "data.train"),
    ("data.eval=''", "data.eval"),
    ("data.input_col=''", "data.input_col"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.max_new_tokens=10000000", "eval.max_new_tokens"),
    ("eval.bootstrap_samples=1000000000", "eval.bootstrap_samples"),
    ("eval.gates=['accuracy>>0.9']", "eval.gates"),
    ("eval.json_schema=''", "eval.json_schema"),
    ("output_dir=/", "output_dir"),
    ("output_dir=..", "output_dir"),
    ("output_dir=.", "output_dir"),
    ("output_dir=./", "output_dir"),
    ("output_dir=''", "output_dir"),
    ("name=../escape", "name"),
    ("model.name=''", "model.name"),
]


def config_check(capsys, *args) -> tuple[int, str, str]:
    from tunesmith.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "check", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def starter(tmp_path_factory):
    config_path, _ = write_starter(tmp_path_factory.mktemp("starter") / "proj", count=12)
    return config_path


@pytest.mark.parametrize("override, key", UNRUNNABLE, ids=[o for o, _ in UNRUNNABLE])
def test_unrunnable_setting_is_one_line_naming_the_key(capsys, starter, override, key):
    code, out, err = config_check(capsys, starter, "--set", override)
    assert code == 2 and "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f": {key}: " in lines[0] and "fix:" in lines[0], lines[0]


def test_config_check_finds_missing_model_data_and_schema(capsys, starter):
    code, out, err = config_check(capsys, starter)
    assert code == 0, err
    for override, key in [
        ("model.name=./no/such/folder", "model.name"),
        ("model.name=not-a-model", "model.name"),
        ("data.train=missing.jsonl", "data.train"),
        ("data.eval=missing.jsonl", "data.eval"),
        ("eval.json_schema=schema.json", "eval.json_schema"),
        ("eval.json_schema=data", "eval.json_schema"),
    ]:
        code, out, err = config_check(capsys, starter, "--set", override)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f": {key}: " in lines[0] and "fix:" in lines[0], (override, err)
    # A hub id cannot be checked offline: it passes; every missing input is listed at once.
    assert config_check(capsys, starter, "--set", "model.name=HuggingFaceTB/SmolLM2-135M-Instruct")[0] == 0
    code, _, err = config_check(capsys, starter, "--set", "data.train=a.jsonl", "--set", "data.eval=b.jsonl")
    assert code == 2 and "data.train:" in err and "data.eval:" in err and "Traceback" not in err
