"""Strict command-line overrides: booleans, unknown keys with a suggestion, types against the bundle's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medad import bundle
from medad.overrides import (
    OverrideError,
    _kind,
    check_overrides,
    describe_keys,
    key_descriptions,
    merged_config,
    parse_bool,
    split_args,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
FAIR_TRAIN = bundle.config_files(REPO / "bundles" / "fair", "train")
TYPES = {"bool", "int", "float", "str", "list", "section"}  # section: a dict value (e.g. a stored brain_geometry)


def _workflow_files(name: str) -> list[list[str]]:
    return [bundle.config_files(REPO / "bundles" / name, w) for w in ("train", "inference", "evaluate", "multi_gpu_train")]


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "0"])
def test_false_in_any_spelling_is_false(text: str):
    assert parse_bool("quick", text) is False
    assert check_overrides(FAIR_TRAIN, {"quick": text}) == {"quick": False}


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", None])
def test_true_in_any_spelling_and_a_bare_flag_are_true(text):
    assert check_overrides(FAIR_TRAIN, {"quick": text}) == {"quick": True}


def test_a_boolean_rejects_other_words():
    with pytest.raises(OverrideError, match=r"--quick takes true or false \(or 1/0\), not 'yes'"):
        check_overrides(FAIR_TRAIN, {"quick": "yes"})


def test_unknown_key_suggests_the_closest():
    with pytest.raises(OverrideError, match="unknown key --max_stepz .*did you mean --max_steps"):
        check_overrides(FAIR_TRAIN, {"max_stepz": "10"})
    with pytest.raises(OverrideError, match="did you mean --image_loaders#batch_size"):
        check_overrides(FAIR_TRAIN, {"image_loaders#batch_sise": "3"})
    with pytest.raises(OverrideError, match="see --help"):
        check_overrides(FAIR_TRAIN, {"zzzzzz": "3"})


def test_types_are_checked_against_the_defaults():
    typed = check_overrides(FAIR_TRAIN, {
        "max_steps": "10", "learning_rate": "1e-3", "widths": "[8, 16]", "seed": "3", "cutoff": "20.5",
        "dataset_dir": "/data/x", "category": "01", "image_loaders#batch_size": "2", "max_minutes": "0.5",
    })
    assert typed == {"max_steps": 10, "learning_rate": 1e-3, "widths": [8, 16], "seed": 3, "cutoff": 20.5,
                     "dataset_dir": "/data/x", "category": "01", "image_loaders#batch_size": 2, "max_minutes": 0.5}
    for key, text, message in [
        ("max_steps", "1.5", "takes an integer"),  # an expression default with a declared type
        ("seed", "x", "takes an integer"),
        ("channels", "3.0", "takes an integer"),
        ("learning_rate", "fast", "takes a number"),
        ("widths", "8", "takes a list"),
        ("image_loaders", "x", "is a config section"),
        ("widths", "[1, 2", "not a valid list"),
    ]:
        with pytest.raises(OverrideError, match=message):
            check_overrides(FAIR_TRAIN, {key: text})
    # a dict-valued key that defaults to null (MRI: the stored brain geometry of a model's training volumes)
    mri = bundle.config_files(REPO / "bundles" / "disyre", "inference")
    assert check_overrides(mri, {"brain_geometry": "{'volume_ml': [1, 2]}"}) == {"brain_geometry": {"volume_ml": [1, 2]}}
    with pytest.raises(OverrideError, match="takes a dict"):
        check_overrides(mri, {"brain_geometry": "5"})


@pytest.mark.parametrize("workflow", ["train", "inference"])
def test_save_maps_takes_only_its_choices_and_reaches_every_evaluator(workflow: str):
    for name in BUNDLES:
        files = bundle.config_files(REPO / "bundles" / name, workflow)
        assert check_overrides(files, {"save_maps": "anomalous", "num_overlays": "0"}) == {
            "save_maps": "anomalous", "num_overlays": 0}
        evaluator = merged_config(files)["evaluator"]
        assert (evaluator["save_maps"], evaluator["num_overlays"]) == ("@save_maps", "@num_overlays"), name
    with pytest.raises(OverrideError, match="takes one of all, anomalous, none, not 'some'"):
        check_overrides(FAIR_TRAIN, {"save_maps": "some"})


def test_arguments_a_component_leaves_at_default_are_valid_overrides():
    typed = check_overrides(FAIR_TRAIN, {"training_step#margin": "0", "high_frequency#extension": "periodic"})
    assert typed == {"training_step#margin": 0, "high_frequency#extension": "periodic"}
    with pytest.raises(OverrideError, match="did you mean --training_step#margin"):
        check_overrides(FAIR_TRAIN, {"training_step#margn": "0"})
    with pytest.raises(OverrideError, match="takes an integer"):
        check_overrides(FAIR_TRAIN, {"training_step#margin": "wide"})


def test_none_survives_monai_run_and_expressions_pass_through():
    # monai.bundle.run drops None-valued overrides, so None travels as the expression "$None"
    assert check_overrides(FAIR_TRAIN, {"max_steps": "none", "category": "null"}) == {
        "max_steps": "$None", "category": "$None"}
    assert check_overrides(FAIR_TRAIN, {"image_size": "$16 * 2"}) == {"image_size": "$16 * 2"}


def test_split_args():
    positional, options = split_args(["bundles/fair", "--quick=false", "--max_steps", "2", "--help", "-h"])
    assert positional == ["bundles/fair"] and options == {"quick": "false", "max_steps": "2", "help": None}
    with pytest.raises(OverrideError, match="given twice"):
        split_args(["--seed", "1", "--seed", "2"])


def test_later_files_and_nested_keys_merge_like_monai(tmp_path: Path):
    (tmp_path / "a.json").write_text(json.dumps({"x": 1, "sec": {"y": 2}}))
    (tmp_path / "b.json").write_text(json.dumps({"x": "z", "sec#y": 3.5}))
    assert merged_config([tmp_path / "a.json", tmp_path / "b.json"]) == {"x": "z", "sec": {"y": 3.5}}
    with pytest.raises(OverrideError, match="not a valid config file"):
        (tmp_path / "c.json").write_text("{")
        merged_config([tmp_path / "c.json"])


@pytest.mark.parametrize("name", BUNDLES)
def test_every_key_of_every_bundle_is_described_and_typed_consistently(name: str):
    described = key_descriptions()
    for files in _workflow_files(name):
        for key, default in merged_config(files).items():
            if key == "imports" or _kind(default) == "section":
                continue
            assert key in described and described[key].get("help"), f"{name}: add '{key}' to medad/schemas/keys.json"
            declared = described[key].get("type")
            if declared is None:
                continue
            kind = declared.rstrip("?")
            assert kind in TYPES, f"keys.json: '{key}' has unknown type {declared!r}"
            if _kind(default) not in ("literal",) and not (kind == "float" and _kind(default) == "int"):
                assert _kind(default) == kind, f"{name}: '{key}' defaults to {default!r}, keys.json says {declared}"
        text = describe_keys(files)
        assert "(no description)" not in text and "--run_dir" in text
