import io
import shutil

import pytest

from gsmtune.ask import LineStream, ask_config, questions_from, run_folder_of
from gsmtune.cli import main
from gsmtune.errors import GsmtuneError


def test_questions_from_arguments_and_stdin():
    assert questions_from(["How many?", "-"], io.StringIO("one?\n\n two? \n")) == ["How many?", "one?", "two?"]
    with pytest.raises(GsmtuneError, match="empty question"):
        questions_from(["  "], io.StringIO())
    with pytest.raises(GsmtuneError, match="empty question"):
        questions_from(["-"], io.StringIO("\n"))


def test_line_stream_shows_only_what_no_stop_rule_can_cut():
    out = io.StringIO()
    shown = LineStream(out)
    for text in [" 48/2", " 48/2 = 24\n", " 48/2 = 24\n#### 24", " 48/2 = 24\n#### 24\nQues"]:
        shown(0, text)
    assert out.getvalue() == " 48/2 = 24\n#### 24\n"  # the '\nQues...' line is held back: the stop rule cuts it
    shown.finish(" 48/2 = 24\n#### 24")
    assert out.getvalue() == " 48/2 = 24\n#### 24\n"


@pytest.fixture
def run_dir(tiny_model_dir, tmp_path):
    """A trained run's folder as `gsmtune train` leaves it: its config (one-shot prompt) and RUN/model."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.yaml").write_text("prompt:\n  strategy: one_shot\n  instruction: true\n")
    return run


def test_a_run_folder_brings_its_own_prompt(run_dir, tiny_model_dir):
    assert run_folder_of(str(run_dir)) == run_folder_of(str(run_dir / "model")) == run_dir
    assert run_folder_of(str(tiny_model_dir)) is None
    cfg = ask_config(str(run_dir), [])
    assert cfg.model.name == str(run_dir / "model")
    assert (cfg.prompt.strategy, cfg.prompt.instruction) == ("one_shot", True)
    cfg = ask_config(str(run_dir / "model"), ["prompt.strategy=zero_shot"])  # a flag overrides the run's choice
    assert (cfg.prompt.strategy, cfg.prompt.instruction) == ("zero_shot", True)


def test_ask_streams_and_ends_with_the_answer(run_dir, capsys):
    assert main(["ask", str(run_dir), "Tom has 3 apples. How many?", "--max-new-tokens", "6", "--dtype", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("answer: ")


def test_ask_with_samples_shows_the_vote(run_dir, capsys):
    assert main(["ask", str(run_dir), "Tom has 3 apples?", "--samples", "3", "--max-new-tokens", "4",
                 "--dtype", "fp32", "--calculator"]) == 0
    assert "(majority of 3 samples: " in capsys.readouterr().out.splitlines()[-1]


def test_bad_input_is_one_line(tmp_path, run_dir, capsys):
    assert main(["ask", str(tmp_path / "nothing"), "How many?"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["ask", str(run_dir), ""]) == 2
    assert "empty question" in capsys.readouterr().err
