"""experiments.commands.run_command: the environment it gives the project's commands, and its log."""
import sys

from experiments import commands

PRINT_ENVIRONMENT = ("import os; print(os.environ['TF_ENABLE_ONEDNN_OPTS'], "
                     "os.environ['TF_CPP_MIN_LOG_LEVEL'])")


def test_commands_run_with_onednn_on_and_quiet_tensorflow_unless_the_environment_says_otherwise(
        tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    log = tmp_path / "run.log"
    returncode, seconds = commands.run_command([sys.executable, "-c", PRINT_ENVIRONMENT],
                                               log_path=str(log))
    assert returncode == 0 and seconds > 0
    assert log.read_text() == "1 1\n" and capsys.readouterr().out == "1 1\n"

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    assert commands.run_command([sys.executable, "-c", PRINT_ENVIRONMENT], log_path=str(log),
                                append=True)[0] == 0
    assert log.read_text() == "1 1\n0 3\n"
