"""The ``medad`` front door: fast help for every command, strict overrides, one-sentence errors with exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medad import bundle, cli
from medad.data.validation import InvalidInputError
from medad.engine.checkpoint import CheckpointMismatchError

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
HELP_SECONDS = 3.0


def _medad(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medad", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


@pytest.mark.parametrize("args", [
    ["--help"], ["run", "--help"], ["run", "--config", "bundles/fair", "--help"], ["preprocess", "--help"],
    ["export", "--help"], ["verify_metadata", "--help"], ["cohort", "--help"],
    ["run", "--config", "bundles/disyre", "--workflow", "inference", "-h"],
])
def test_every_help_answers_fast_without_a_pager(args: list[str]):
    start = time.perf_counter()
    result = _medad(*args, env={"PAGER": "false"})  # a pager would fail (fire's did); none must be opened
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and not result.stderr
    assert seconds < HELP_SECONDS, f"medad {' '.join(args)} took {seconds:.1f} s"


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom medad.cli import main\n"
            "for a in (['--help'], ['run', '--config', 'bundles/addm', '--help'], ['preprocess', '--help'],"
            " ['export', '--help']):\n    assert main(a) == 0\n"
            "print(sorted(m for m in ('torch', 'monai', 'ants', 'numpy', 'fire') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_top_level_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "preprocess", "verify_metadata", "export", "bundle", "cohort"):
        assert f"\n  {command} " in out
    assert set(cli.COMMANDS) == {"run", "preprocess", "verify_metadata", "export", "bundle", "cohort"}


@pytest.mark.parametrize("name", BUNDLES)
def test_run_help_lists_the_bundles_keys_with_defaults_and_descriptions(name: str, capsys):
    assert cli.main(["run", "--config", f"bundles/{name}", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--run_dir " in out and "--seed 0\n      random seed" in out and "(no description)" not in out


def test_quick_false_reaches_the_bundle_as_false(monkeypatch):
    seen = {}
    monkeypatch.setattr(bundle, "run", lambda config, **kwargs: seen.update(kwargs, config=config))
    assert cli.main(["run", "--config", "bundles/fair", "--quick", "false", "--max_steps", "3",
                     "--dataset_dir=/data/x"]) == 0
    assert seen["quick"] is False and seen["max_steps"] == 3 and seen["dataset_dir"] == "/data/x"
    assert seen["workflow"] == "train" and seen["config"] == "bundles/fair"


@pytest.mark.parametrize("args, message", [
    (["run", "--config", "bundles/fair", "--max_stepz", "10"], "unknown key --max_stepz .*did you mean --max_steps?"),
    (["run", "--config", "bundles/fair", "--quick", "nope"], "--quick takes true or false"),
    (["run", "--config", "bundles/fair", "--workflow", "infer"], "unknown --workflow 'infer'"),
    (["run", "--config", "bundles/no_such_bundle"], "not a bundle folder"),
    (["run"], "needs --config"),
    (["rnu", "--config", "bundles/fair"], "did you mean run?"),
    (["verify_metadata", "--config", "bundles/fair", "--seed", "1"], "takes only --config"),
    (["export", "--config", "bundles/fair", "--imagesize", "32"], "did you mean --image_size?"),
])
def test_bad_input_is_one_sentence_and_exit_code_2(args: list[str], message: str, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"medad {args[0]}: error: ")
    assert re.search(message, err), err


def test_errors_are_unwrapped_from_monai_chains():
    def wrapped(error: Exception) -> Exception:
        try:
            try:
                raise error
            except Exception as inner:
                raise RuntimeError("Failed to instantiate component 'evaluator'") from inner
        except RuntimeError as outer:
            return outer

    assert cli.explain_error(wrapped(InvalidInputError("a.png: not a readable image file."))) == (
        2, "a.png: not a readable image file.")
    assert cli.explain_error(wrapped(CheckpointMismatchError("model.pt: written by bundle fair."))) == (
        2, "model.pt: written by bundle fair.")
    missing = FileNotFoundError(2, "No such file or directory", "/data/x.png")
    assert cli.explain_error(wrapped(missing)) == (2, "/data/x.png: no such file or directory; check the path.")
    code, sentence = cli.explain_error(wrapped(ZeroDivisionError("division by zero")))
    assert code == 1 and sentence.startswith("ZeroDivisionError: division by zero (rerun with --debug")
    # a DataLoader worker re-raises the error as traceback text
    text = RuntimeError("Caught InvalidInputError in DataLoader worker process 0.\nOriginal Traceback:\n"
                        "medad.data.validation.InvalidInputError: b.nii.gz: 4D series.")
    assert cli.explain_error(text) == (2, "b.nii.gz: 4D series.")


def test_debug_shows_the_traceback(monkeypatch):
    def fail(config, **kwargs):
        raise InvalidInputError("x.png: broken.")

    monkeypatch.setattr(bundle, "run", fail)
    assert cli.main(["run", "--config", "bundles/fair"]) == 2
    with pytest.raises(InvalidInputError):
        cli.main(["run", "--config", "bundles/fair", "--debug"])
    monkeypatch.setenv("MEDAD_DEBUG", "1")
    with pytest.raises(InvalidInputError):
        cli.main(["run", "--config", "bundles/fair"])


def test_a_real_bad_dataset_exits_2_with_one_sentence(tmp_path: Path):
    empty = tmp_path / "empty_category"
    empty.mkdir()
    result = _medad("run", "--config", "bundles/fair", "--dataset_dir", str(empty), "--run_dir", str(tmp_path / "run"),
                    "--max_steps", "1", "--num_workers", "0")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medad run: error: ") and str(empty) in last and "Traceback" not in result.stderr
