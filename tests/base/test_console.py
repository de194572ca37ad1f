"""Messages on stderr: a note, a warning or an error is one line in a log, however long (not wrapped at the
80 columns Rich assumes when stderr is not a terminal)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.table import Table

from rlhfkit.console import MessageConsole


@pytest.mark.slow
def test_a_long_deprecation_note_and_an_error_are_one_line_each_in_a_log(tmp_path):
    missing = tmp_path / ("a-folder-long-enough-to-push-the-error-past-eighty-columns" * 2) / "demos.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    command = [sys.executable, "-m", "rlhfkit.cli", "sft", "--model", "tiny", "--output", str(tmp_path)]
    command += ["--set", "group_window=4", "--set", f"data.path={missing}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    note = "deprecated: setting 'group_window' is now 'data.group_window' "
    note += "(the old name works until rlhfkit 0.3)"
    assert lines == [note, f"error: {missing}: no such file"]
    assert len(note) > 80


def test_only_text_messages_skip_wrapping_and_a_terminal_still_wraps():
    log = io.StringIO()  # not a terminal
    console = MessageConsole(file=log, width=40)
    console.print("warning: " + "word " * 30, highlight=False)
    assert len(log.getvalue().splitlines()) == 1
    table = Table("setting", "value")
    table.add_row("x" * 60, "1")
    console.print(table)  # a table keeps Rich's layout within the width
    assert all(len(line) <= 40 for line in log.getvalue().splitlines()[1:])

    terminal = io.StringIO()
    MessageConsole(file=terminal, width=40, force_terminal=True).print("note: " + "word " * 30)
    assert len(terminal.getvalue().splitlines()) > 1


def test_quiet_transformers_silences_the_gguf_readers_plain_tqdm_bar(capfd):
    """The one-off GGUF conversion drew "Converting and de-quantizing" with plain tqdm, which transformers'
    own progress-bar switch does not reach; inside `quiet_transformers` it draws nothing, and after it the
    module's tqdm is the original again."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from rlhfkit.console import quiet_transformers

    original = gguf_utils.tqdm
    with quiet_transformers():
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "Converting" not in capfd.readouterr().err
    assert gguf_utils.tqdm is original
    for _ in gguf_utils.tqdm(range(3), desc="drawn again", mininterval=0):
        pass
    assert "drawn again" in capfd.readouterr().err
