"""Every ``prodrep`` command builds its config from flags generated from its config class
(:func:`common.config.add_config_flags`): ``--set key=value``, the field's own flag and a YAML
``--config`` file all reach the config object, with one precedence rule. Parse only: no job runs."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import ConfigError
from prodrep.cli import COMMANDS, build_parser, get_command

# command -> (arguments every parse needs, field, value as typed, value in the config)
CASES: dict[str, tuple[list[str], str, str, object]] = {
    "ingest": (["--dataset", "online-retail"], "event_type", "click", "click"),
    "sessions": ([], "gap_minutes", "12.5", 12.5),
    "cooccur": ([], "min_count", "3", 3),
    "tokenize": ([], "vocab_size", "500", 500),
    "train-mlm": ([], "lr", "0.123", 0.123),
    "train-items": ([], "lr", "0.123", 0.123),  # was dropped: `--set lr=0.123` left lr None
    "embed": (["--model", "some/model"], "batch_size", "32", 32),
    "neighbors": ([], "k", "7", 7),
    "similar": (["85123A"], "k", "3", 3),
    "search": (["christmas lights"], "k", "3", 3),
    "evaluate": ([], "max_queries", "123", 123),
    "pipeline": (["--dataset", "online-retail"], "workers", "3", 3),
}


def _config(command: str, argv: list[str], lake: str):
    """Parse ``prodrep <command> --lake LAKE <argv>`` and build its config."""
    args = build_parser(command).parse_args([command, "--lake", lake, *argv])
    return args._runner.parse(args)


def test_every_command_is_covered():
    assert set(CASES) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(CASES))
@pytest.mark.parametrize("how", ["set", "flag", "yaml"])
def test_value_reaches_the_config(command, how, tmp_path):
    base, field, typed, expected = CASES[command]
    default = getattr(_config(command, base, str(tmp_path)), field)
    assert default != expected
    if how == "set":
        extra = ["--set", f"{field}={typed}"]
    elif how == "flag":
        extra = ["--" + field.replace("_", "-"), typed]
    else:
        path = tmp_path / "job.yaml"
        path.write_text(f"{field}: {typed}\n")
        extra = ["--config", str(path)]
    cfg = _config(command, [*extra, *base], str(tmp_path))
    assert getattr(cfg, field) == expected
    assert cfg.lake == str(tmp_path)


def test_one_precedence_rule_flag_over_set_over_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("lr: 0.3\nworkers: 5\nseed: 9\n")
    cfg = _config("train-items", ["--config", str(path), "--set", "lr=0.2", "--set", "workers=4", "--lr", "0.1"], str(tmp_path))
    assert (cfg.lr, cfg.workers, cfg.seed) == (0.1, 4, 9)  # flag > --set > YAML > default


def test_train_items_set_no_longer_dropped(tmp_path):
    cfg = _config("train-items", ["--set", "lr=0.123", "--set", "workers=3"], str(tmp_path))
    assert (cfg.lr, cfg.workers) == (0.123, 3)


def test_bool_aliases_and_lists(tmp_path):
    cfg = _config("train-mlm", ["--gpu", "--restart", "--name", "r1"], str(tmp_path))
    assert cfg.gpu is True and cfg.restart is True and cfg.run_name == "r1"
    assert _config("train-mlm", ["--gpu", "false"], str(tmp_path)).gpu is False
    ev = _config("evaluate", ["--methods", "popularity,cooc_cosine", "--report", "r", "--json", "j.json"], str(tmp_path))
    assert ev.methods == ("popularity", "cooc_cosine") and ev.report_dir == "r" and ev.json_file == "j.json"
    ing = _config("ingest", ["--events", "e.csv", "--events-map", "session_id=a,item_id=b,title=c"], str(tmp_path))
    assert ing.events_map == {"session_id": "a", "item_id": "b", "title": "c"}


def test_bad_values_say_which_field(tmp_path):
    with pytest.raises(ConfigError, match="workers"):
        _config("train-items", ["--workers", "two"], str(tmp_path))
    with pytest.raises(ConfigError, match="unknown option"):
        _config("neighbors", ["--set", "nope=1"], str(tmp_path))
    with pytest.raises(SystemExit):  # argparse: --preset and --init are exclusive
        _config("train-mlm", ["--preset", "tiny", "--init", str(tmp_path)], str(tmp_path))


@pytest.mark.parametrize("command", sorted(CASES))
def test_every_field_has_help(command):
    undocumented = [f.name for f in dataclasses.fields(get_command(command).config) if not f.metadata.get("help")]
    assert not undocumented, f"document these fields with common.config.option(default, help): {undocumented}"


@pytest.mark.parametrize("command", ["train-mlm", "train-items"])
def test_smoke_test_flag_parses_to_a_tiny_run(command, tmp_path):
    assert _config(command, [], str(tmp_path)).smoke_test is False
    cfg = _config(command, ["--smoke-test", "--run-name", "r"], str(tmp_path))
    assert cfg.smoke_test is True
    assert _config(command, ["--set", "smoke_test=true"], str(tmp_path)).smoke_test is True
    tiny = cfg.smoke()
    assert tiny.run_name == "r-smoke" and tiny.restart is True and tiny.smoke_test is False
    if command == "train-mlm":
        assert (tiny.preset, tiny.init, tiny.max_steps, tiny.batch_size) == ("tiny", None, 2, 8)
    else:
        assert (tiny.text_steps, tiny.batch_size, tiny.pairs, tiny.epochs) == (2, 16, 16 * 4 * cfg.workers, 1)
