"""How the command-line tools report what the user typed wrong (`guided_diffusion.errors`)."""

import pytest

from guided_diffusion import checkpoints, errors, respace, script_util


def _fails_with(error):
    def main(argv):
        raise error
    return main


def test_marked_errors_keep_the_type_a_caller_of_the_original_catches():
    with pytest.raises(ValueError, match="cannot parse timestep_respacing 'abc'") as info:
        respace.space_timesteps(100, "abc")
    assert type(info.value) is ValueError and errors.is_usage_error(info.value)
    with pytest.raises(NotImplementedError) as info:
        script_util.create_gaussian_diffusion(noise_schedule="quadratic")
    assert type(info.value) is NotImplementedError and errors.is_usage_error(info.value)


def test_unmarked_errors_are_not_usage_errors():
    assert not errors.is_usage_error(ValueError("a bug"))
    assert errors.is_usage_error(errors.UsageError("--x must be positive"))


@pytest.mark.parametrize("error", [
    errors.usage(FileNotFoundError("data directory 'x' does not exist; check --data_dir")),
    errors.UsageError("--num_samples must be a positive number, got 0"),
    checkpoints.CheckpointError("the checkpoint looks like a UNet built with --num_channels 32"),
], ids=["marked", "usage", "checkpoint"])
def test_run_main_prints_one_line_and_exits_2(error, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["tool.py"])
    with pytest.raises(SystemExit) as info:
        errors.run_main(_fails_with(error), [])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"tool.py: error: {error}\n"


def test_run_main_keeps_the_traceback_of_anything_else(capsys):
    bug = ValueError("an internal bug")
    with pytest.raises(ValueError) as info:
        errors.run_main(_fails_with(bug), [])
    assert info.value is bug
    assert capsys.readouterr().err == ""


def test_run_main_passes_argv_and_returns_normally():
    seen = []
    errors.run_main(seen.append, ["--flag", "1"])
    assert seen == [["--flag", "1"]]
