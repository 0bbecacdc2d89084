"""``medad`` command line: run bundles by folder, verify their metadata, export, preprocess MRI cohorts.

Examples::

    medad run --config bundles/disyre                       # train + evaluate on the embedded demo data
    medad run --config bundles/fair --dataset_dir /data/mvtec_ad --category bottle --quick false
    medad run --config bundles/fair --workflow inference --input_dir /data/new_images
    medad run --config bundles/fair --help                  # the bundle's keys, defaults and descriptions
    medad verify_metadata --config bundles/fair
    medad export --config bundles/fair --run_dir runs/fair/demo
    medad preprocess --input /data/ixi --output /data/ixi_preprocessed
    medad cohort summarize runs/fair/demo runs/zscore/demo --output table   # metrics with bootstrap intervals

Overrides are strict (:mod:`medad.overrides`): an unknown key or a value of the wrong type is an error, not a
silent default. Errors print one sentence on stderr and exit with code 2 for bad input (a bad file, setting or
folder), 1 otherwise; ``--debug`` (or ``MEDAD_DEBUG=1``) shows the full traceback instead.

Nothing heavy (torch, MONAI, ANTs) is imported before the arguments are parsed, so every ``--help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medad.overrides import (
    OverrideError,
    check_overrides,
    describe_keys,
    parse_bool,
    split_args,
)

__all__ = ["BAD_INPUT_ERRORS", "COMMANDS", "explain_error", "main"]

#: subcommand -> one-line summary (``medad --help``)
COMMANDS: dict[str, str] = {
    "run": "run a bundle: train + evaluate (default), or --workflow inference | evaluate | multi_gpu_train",
    "preprocess": "preprocess a cohort of brain MRI volumes (reorient, N4, skull strip, register, normalise)",
    "verify_metadata": "check a bundle's configs/metadata.json against the shipped schema (offline)",
    "export": "export a bundle's trained network (TorchScript, torch.export .pt2 or ONNX), calibrated thresholds included",
    "bundle": "bundle pack BUNDLE OUT_DIR [--data D]: a self-contained MONAI bundle (configs merged, weights, docs, "
              "metadata with file hashes) that stock `python -m monai.bundle run` runs from any folder",
    "cohort": "cohort summarize RUN_OR_EVAL_DIR ...: one table of runs, with 95 % bootstrap intervals over cases; "
              "cohort merge-shards OUT_DIR: merge the tables of --shard runs",
}

#: exception classes that mean bad input, matched by name along the class hierarchy (so their subclasses count
#: too, and nothing needs importing to classify an error): exit code 2 and only their one-sentence message
BAD_INPUT_ERRORS: frozenset[str] = frozenset({
    "OverrideError",  # medad.overrides
    "InvalidInputError",  # medad.data.validation
    "CheckpointMismatchError",  # medad.engine.checkpoint
    "RunFolderMismatchError",  # medad.engine.run_folder
    "FileNotFoundError",
    "NotADirectoryError",
    "IsADirectoryError",
})

WORKFLOW_NAMES = ("train", "inference", "evaluate", "multi_gpu_train")
#: options of ``medad run`` that are not config keys; ``tracking`` (and its settings) become the ``tracker`` component
_TRACKING_KEYS = ("tracking", "tracking_uri", "experiment_name", "run_name", "save_execute_config")

USAGE = """usage: medad <command> [--key value ...]    (medad <command> --help for its options)

commands:
{commands}

options of every command:
  --debug      show the full traceback of an error (or set MEDAD_DEBUG=1)
  -h, --help   show help and exit
"""

RUN_USAGE = """usage: medad run --config BUNDLE [--workflow W] [--extra_configs FILES] [--key value ...]

Run a bundle folder (or bundle name) the way `python -m monai.bundle run` runs its config files.

front options:
  --config BUNDLE        bundle folder (bundles/fair) or name (fair)
  --workflow W           train (train + calibrate + evaluate; default), inference, evaluate, multi_gpu_train
  --data D               industrial or mri: the data domain (configs/data/D.json and the bundle's own D.json);
                         default: the bundle's own (inference/evaluate: the data the run was trained on)
  --extra_configs FILES  more config files merged after the workflow's, e.g. "['fast.json']"
  --print_command        print the equivalent stock `python -m monai.bundle run --config_file [...]` and exit
  --run_id ID            config entry to run (default: run)
  --shard K/N            inference / evaluate: only shard K of N of the sorted cases (a SLURM array task each);
                         the last shard to finish merges the tables (or: medad cohort merge-shards OUTPUT_DIR)
  --tracking mlflow      experiment tracking with MLflow (pip install "medad[tracking]"): parameters, losses,
                         learning curve, metrics, calibration, result files; store <run_dir>/mlruns.db unless
                         --tracking_uri URI; also --experiment_name NAME, --run_name NAME
  --debug                full traceback on error

Every other --key value overrides a config key; `medad run --config BUNDLE --help` lists them.
Booleans take true/false (any case) or 1/0; an unknown key or a value of the wrong type is an error.
"""

EXPORT_USAGE = """usage: medad export --config BUNDLE [--format F] [--run_dir DIR] [--ckpt_file PT] [--filepath FILE]
                    [--key value ...]

Export the trained network (DIR/models/model.pt, or the bundle's shipped weights) with the calibrated thresholds
and the fingerprint of the weights embedded. Any export runs in the inference workflow as --ckpt_path FILE.

  --format F   torchscript (default; `monai.bundle ckpt_export`, model.ts; deprecated by PyTorch, kept working),
               pt2 (torch.export, model.pt2) or onnx (model.onnx, run with onnxruntime; pip install "medad[export]").
               pt2 and onnx are the formats that last; both keep batch and image sizes free.

Other --key value pairs override keys of the bundle's inference.json
(`medad run --config BUNDLE --workflow inference --help` lists them).
"""

VERIFY_USAGE = """usage: medad verify_metadata --config BUNDLE

Validate BUNDLE/configs/metadata.json against the bundle-metadata schema shipped with medad (no network needed).
"""


def _debug_requested(argv: list[str]) -> bool:
    env = os.environ.get("MEDAD_DEBUG", "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no")


def _wants_help(options: dict[str, str | None]) -> bool:
    return "help" in options and (options["help"] is None or parse_bool("help", options["help"]))


def _take_config(positional: list[str], options: dict[str, str | None], command: str) -> str:
    config = options.pop("config", None) or (positional.pop(0) if positional else None)
    if not config:
        raise OverrideError(f"medad {command} needs --config <bundle folder or name>, e.g. --config bundles/fair.")
    if positional:
        raise OverrideError(f"unexpected argument {positional[0]!r}; options are given as --key value.")
    return config


def _workflow_files(config: str, workflow: str, extra: Sequence[str], data: str | None = None) -> list[str]:
    from medad import bundle  # light: the standard library only at import time

    if workflow not in WORKFLOW_NAMES:
        raise OverrideError(f"unknown --workflow {workflow!r}; choose one of {', '.join(WORKFLOW_NAMES)}.")
    return bundle.config_files(config, workflow, data) + list(extra)


def stock_command(files: Sequence[str], bundle_dir: str | os.PathLike) -> str:
    """The ``python -m monai.bundle run`` command that runs ``files`` (paths relative to the working folder)."""
    from medad import bundle

    def short(path: str | os.PathLike) -> str:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)

    listed = ",".join(f"'{short(f)}'" for f in files)
    meta = Path(bundle_dir) / "configs" / "metadata.json"
    return (f'python -m monai.bundle run --config_file "[{listed}]" --meta_file {short(meta)} '
            f"--logging_file {short(bundle.logging_file(bundle_dir))}")


def _extra_configs(text: str | None, config: str) -> list[str]:
    """``--extra_configs``: a list literal or comma-separated paths; a bare name is looked up in the bundle too."""
    import ast

    if text is None:
        return []
    text = text.strip()
    names = ast.literal_eval(text) if text[:1] in "[(" else [t for t in text.split(",") if t.strip()]
    if isinstance(names, str):
        names = [names]
    files = []
    for name in map(str, names):
        path = Path(name.strip()).expanduser()
        inside = Path(config) / "configs" / path.name
        if not path.is_file() and inside.is_file():
            path = inside
        if not path.is_file():
            raise OverrideError(f"--extra_configs: {name} is not a file; give a path to a .json/.yaml config.")
        files.append(str(path))
    return files


def _run(argv: list[str]) -> int:
    positional, options = split_args(argv)
    help_wanted = _wants_help(options)
    options.pop("help", None)
    if help_wanted and not (options.get("config") or positional):
        print(RUN_USAGE)
        return 0
    config = _take_config(positional, options, "run")
    workflow = options.pop("workflow", None) or "train"
    run_id = options.pop("run_id", None) or "run"
    shard = options.pop("shard", None)
    extra = _extra_configs(options.pop("extra_configs", None), config)
    data = options.pop("data", None)
    files = _workflow_files(config, workflow, extra, data)
    print_command = options.pop("print_command", "false")
    if print_command is None or parse_bool("print_command", print_command):
        from medad import bundle

        print(stock_command(files, bundle._bundle_dir(config)))
        return 0
    if help_wanted:
        print(RUN_USAGE)
        print(f"bundle {config}, workflow {workflow} ({', '.join(os.path.basename(f) for f in files)}):\n")
        print(describe_keys(files))
        return 0
    if workflow in ("inference", "evaluate") and data is None:  # check the keys of the data the run was trained on
        from medad import bundle  # reads the run record with MONAI's parser: not for --help

        located = {k: options[k] for k in ("run_dir", "ckpt_path") if options.get(k)}
        folder = bundle._bundle_dir(config)
        files = bundle._workflow_files(folder, workflow, None, extra, {"bundle_root": str(folder), **located})[0]
    overrides = check_overrides(files, options, extra_keys=_TRACKING_KEYS)
    from medad import bundle

    _quiet_about_shipped_configs(files, bundle.REPO_ROOT)
    bundle.run(config, workflow=workflow, run_id=run_id, extra_configs=extra or None, shard=shard, data=data,
               **overrides)
    return 0


def _quiet_about_shipped_configs(files: Sequence[str], shipped: Path) -> None:
    """Silence MONAI's "only run configs you trust" warning when every config file is one medad ships (``shipped``
    is the checkout holding ``bundles/`` and ``configs/``).

    The warning is right for configs from elsewhere (a user's own bundle or --extra_configs keep it), and noise
    before every run of the bundles that come with medad.
    """
    import warnings

    roots = [(shipped / name).resolve() for name in ("bundles", "configs")]
    if all(any(Path(f).resolve().is_relative_to(root) for root in roots) for f in files):
        warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)


def _export(argv: list[str]) -> int:
    positional, options = split_args(argv)
    if _wants_help(options):
        print(EXPORT_USAGE)
        return 0
    config = _take_config(positional, options, "export")
    front = {k: options.pop(k) for k in ("ckpt_file", "filepath", "format") if k in options}
    overrides = check_overrides(_workflow_files(config, "inference", []), options)
    from medad import bundle

    print(f"exported: {bundle.export(config, **front, **overrides)}")
    return 0


def _verify_metadata(argv: list[str]) -> int:
    positional, options = split_args(argv)
    if _wants_help(options):
        print(VERIFY_USAGE)
        return 0
    config = _take_config(positional, options, "verify_metadata")
    if options:
        raise OverrideError(f"medad verify_metadata takes only --config, not --{next(iter(options))}.")
    from medad import bundle

    bundle.verify_metadata(config)
    print(f"{config}: metadata.json is valid.")
    return 0


def _preprocess(argv: list[str]) -> int:
    from medad.preprocess_args import (
        build_parser,  # light: --help and usage errors answer before any heavy import
    )

    try:
        build_parser(prog="medad preprocess").parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2), already printed by argparse
        return int(done.code or 0)
    from medad.preprocess import main as preprocess_main

    return int(preprocess_main(argv) or 0)


BUNDLE_USAGE = """usage: medad bundle pack BUNDLE OUT_DIR [--data industrial|mri]

Write BUNDLE as a self-contained MONAI bundle in OUT_DIR (new or empty): configs/{train,inference,evaluate,
multi_gpu_train}.json with the shared configs/ merged in and the shipped model's stored settings applied,
metadata.json (with files_sha256) and logging.conf, models/ and docs/. Run it from any folder with
  python -m monai.bundle run --config_file OUT_DIR/configs/inference.json --meta_file OUT_DIR/configs/metadata.json \\
      --logging_file OUT_DIR/configs/logging.conf --input_dir IMAGES
(bundle_root is OUT_DIR's absolute path; pass --bundle_root after moving the folder).
"""


def _bundle(argv: list[str]) -> int:
    positional, options = split_args(argv)
    if _wants_help(options) or not positional:
        print(BUNDLE_USAGE)
        return 0
    action, *rest = positional
    if action != "pack":
        raise OverrideError(f"medad bundle takes the action pack, not {action!r}.")
    if len(rest) != 2:
        raise OverrideError("medad bundle pack needs BUNDLE and OUT_DIR, e.g. medad bundle pack bundles/fair /tmp/fair.")
    data = options.pop("data", None)
    if options:
        raise OverrideError(f"medad bundle pack takes only --data, not --{next(iter(options))}.")
    from medad import bundle

    out = bundle.pack(rest[0], rest[1], data=data)
    bundle.verify_metadata(out)
    print(f"packed {rest[0]} -> {out}")
    return 0


COHORT_USAGE = """usage: medad cohort summarize [LABEL=]FOLDER [[LABEL=]FOLDER ...] [--output PREFIX]
                              [--resamples N] [--level 0.95] [--seed 0] [--no-baselines]

Merge evaluations into one table (Markdown on stdout; PREFIX.csv and PREFIX.md with --output). FOLDER is an
evaluation folder (metrics.json + cases.parquet/csv: <run_dir>/eval, or an --output_dir) or a run folder (its eval/).
Rows: method, cases, image AUROC, the pooled pixel metrics, and the per-case AP / best Dice / Dice at the calibrated
threshold as mean [95 % percentile-bootstrap interval over cases]. Each evaluation's baselines (measured on its
own test cases, metrics.json "baselines") follow its row as rows "LABEL [zscore baseline]"; --no-baselines drops them.

usage: medad cohort merge-shards OUT_DIR

Merge the shards of `medad run ... --shard K/N --output_dir OUT_DIR` (cases.csv/.parquet, metrics.json, report.html
over every case) or of `medad preprocess ... --shard K/N --output OUT_DIR` (preprocess_log.csv). The last shard to
finish merges by itself; this is for a merge job of its own (e.g. a SLURM job after the array).
"""


def _cohort(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="medad cohort", usage=COHORT_USAGE, add_help=False)
    parser.add_argument("action", nargs="?")
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--output", default=None)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", dest="baselines", action="store_false")
    parser.add_argument("-h", "--help", action="store_true")
    # intermixed: options may come before the folders too (`summarize --no-baselines A B`)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if args.help or args.action is None:
        print(COHORT_USAGE)
        return 0 if args.help else 2
    if args.action == "merge-shards":
        if unknown or len(args.folders) != 1:
            raise OverrideError("medad cohort merge-shards takes one folder: the output folder of the sharded runs.")
        from medad.engine.shards import merge_shards

        try:
            written = merge_shards(args.folders[0])
        except ValueError as error:
            raise OverrideError(str(error)) from error
        print("merged: " + ", ".join(str(p) for p in written))
        return 0
    if args.action != "summarize":
        raise OverrideError(f"unknown cohort action {args.action!r}; the actions are: summarize, merge-shards.")
    if unknown:
        raise OverrideError(f"medad cohort summarize does not take {unknown[0]}; see medad cohort --help.")
    if not args.folders:
        raise OverrideError("medad cohort summarize needs at least one evaluation or run folder.")
    folders = []
    for text in args.folders:
        label, sep, folder = text.partition("=")
        folders.append((label, folder) if sep else (None, text))
    from medad.engine.cohort import summarize, to_markdown

    table = summarize(folders, n_resamples=args.resamples, level=args.level, seed=args.seed,
                      baselines=args.baselines)
    markdown = to_markdown(table, level=args.level)
    print(markdown)
    if args.output:
        from medad.io import atomic_write

        with atomic_write(f"{args.output}.md", "w") as out:
            out.write(markdown + "\n")
        with atomic_write(f"{args.output}.csv", "w") as out:
            table.to_csv(out, index=False)
        print(f"written: {args.output}.md, {args.output}.csv")
    return 0


_HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "run": _run,
    "preprocess": _preprocess,
    "verify_metadata": _verify_metadata,
    "export": _export,
    "bundle": _bundle,
    "cohort": _cohort,
}


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it, outermost first (MONAI wraps the real error in "Failed to instantiate ...")."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _is_bad_input(error: BaseException) -> bool:
    return any(cls.__name__ in BAD_INPUT_ERRORS for cls in type(error).__mro__)


def _sentence(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:  # "[Errno 2] ..." -> name the path
        return f"{error.filename}: {error.strerror.lower()}; check the path."
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def explain_error(error: BaseException) -> tuple[int, str]:
    """``(exit code, one sentence)`` for an exception that ended a command.

    Bad input anywhere in the chain (see :data:`BAD_INPUT_ERRORS`, or an ``InvalidInputError`` that a DataLoader
    worker re-raised as text) -> code 2 and its own message; anything else -> code 1 and the innermost cause.
    """
    chain = _chain(error)
    for item in chain:
        if _is_bad_input(item):
            return 2, _sentence(item)
    if "medad.data.validation" in sys.modules:  # a worker process's error arrives as traceback text
        from medad.data.validation import input_error

        found = input_error(error)
        if found is not None:
            return 2, _sentence(found)
    root = chain[-1]
    return 1, f"{type(root).__name__}: {_sentence(root)} (rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medad`` console script and ``python -m medad``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    commands = "\n".join(f"  {name:<16} {summary}" for name, summary in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands=commands))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handler = _HANDLERS.get(command)
    try:
        if handler is None:
            import difflib

            match = difflib.get_close_matches(command, list(COMMANDS), n=1)
            hint = f"did you mean {match[0]}?" if match else f"choose one of {', '.join(COMMANDS)}."
            raise OverrideError(f"unknown command {command!r}; {hint}")
        return handler(rest)
    except KeyboardInterrupt:
        if debug:
            raise
        print("medad: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more may reach the closed pipe
        return 0
    except Exception as error:
        if debug:
            raise
        code, sentence = explain_error(error)
        print(f"medad {command}: error: {sentence}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
