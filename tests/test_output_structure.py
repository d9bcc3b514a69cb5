"""The output structure as data: encoded from the model's pytree, checked when read from a file
(closed vocabulary, bounded depth, each output once), rebuilt as the model's own types."""

import collections
import json
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import kiln
from kiln import specs
from kiln.specs import build_structure, encode_structure, validate_structure

Pair = collections.namedtuple("Pair", ["first", "second"])


def _encode(value):
    leaves, spec = pytree.tree_flatten(value)
    return encode_structure(spec), leaves


def test_namedtuple_and_nesting_round_trip_as_the_same_types():
    value = {"p": Pair(torch.ones(1), [torch.zeros(2), (torch.ones(3),)]), "n": torch.ones(4)}
    structure, leaves = _encode(value)
    validate_structure(structure, len(leaves))
    json.dumps(structure)  # plain data
    out = build_structure(structure, leaves)
    assert type(out["p"]) is Pair and out["p"].second[1][0] is leaves[2]
    assert isinstance(out["p"].second, list) and isinstance(out["p"].second[1], tuple)


def test_a_namedtuple_not_seen_in_this_process_is_recreated_by_name_and_fields():
    body = {"name": "Scores", "module": "elsewhere", "qualname": "Scores", "fields": ["logits", "pooled"],
            "values": [{"leaf": 0}, {"leaf": 1}]}
    structure = {"namedtuple": body}
    validate_structure(structure, 2)
    out = build_structure(structure, ["a", "b"])
    assert type(out).__name__ == "Scores" and out._fields == ("logits", "pooled")
    assert out.logits == "a" and out.pooled == "b"
    assert type(out) is not Pair


def test_model_output_resolves_from_transformers_only():
    from transformers.modeling_outputs import BaseModelOutput

    value = BaseModelOutput(last_hidden_state=torch.ones(2))
    structure, leaves = _encode(value)
    assert structure["model_output"]["class"] == "transformers.modeling_outputs.BaseModelOutput"
    out = build_structure(structure, leaves)
    assert type(out) is BaseModelOutput and out.last_hidden_state is leaves[0]


def _model_output(cls_path):
    return {"model_output": {"class": cls_path, "keys": ["logits"], "values": [{"leaf": 0}]}}


@pytest.mark.parametrize(
    "path, why",
    [
        ("os.path.join", "outside the packages"),  # not an allowlisted package
        ("antigravity.fly", "outside the packages"),  # importing it would open a web browser
        ("transformers.PreTrainedModel", "not a transformers ModelOutput"),  # allowlisted, wrong kind
        ("transformers.modeling_outputs.NoSuchOutput", "not a transformers ModelOutput"),
        ("transformers.no_such_module_kiln.X", "cannot be imported"),
    ],
)
def test_model_output_that_cannot_be_resolved_safely_is_a_dict_with_a_warning(path, why):
    specs._RESOLVED.pop(path, None)
    with pytest.warns(kiln.KilnWarning, match=why):
        out = build_structure(_model_output(path), ["x"])
    assert out == {"logits": "x"}
    assert "antigravity" not in sys.modules, "a module named by a file outside the allowlist was imported"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved once: no warning on every call
        assert build_structure(_model_output(path), ["y"]) == {"logits": "y"}


def test_model_output_class_is_resolved_in_a_fresh_process(tmp_path):
    # a process that never built the model, and has not imported the output's module
    structure = _model_output("transformers.modeling_outputs.SequenceClassifierOutput")
    code = (
        "import json, sys; from kiln.specs import build_structure, validate_structure\n"
        f"s = json.loads({json.dumps(json.dumps(structure))}); validate_structure(s, 1)\n"
        "out = build_structure(s, [1])\n"
        "print(type(out).__module__ + '.' + type(out).__name__, out.logits)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "transformers.modeling_outputs.SequenceClassifierOutput 1" in result.stdout


GOOD = {"dict": {"keys": ["a", 3], "values": [{"leaf": 1}, {"list": [{"leaf": 0}, {"tuple": []}]}]}}


@pytest.mark.parametrize(
    "structure, n, message",
    [
        ({"leaf": 0, "list": []}, 1, "one key"),
        ([], 0, "one key"),
        ({"set": []}, 0, "unknown structure node kind 'set'"),
        ({"leaf": 1}, 1, r"leaf index must be an integer in \[0, 1\)"),
        ({"leaf": -1}, 1, "leaf index"),
        ({"leaf": True}, 2, "leaf index"),
        ({"leaf": "0"}, 1, "leaf index"),
        ({"tuple": [{"leaf": 0}, {"leaf": 0}]}, 2, r"exactly once \(missing \[1\], repeated \[0\]\)"),
        ({"list": {"leaf": 0}}, 1, "expected a list"),
        ({"dict": {"keys": ["a"], "values": []}}, 0, "same length"),
        ({"dict": {"keys": [["a"]], "values": [{"leaf": 0}]}}, 1, "strings or integers"),
        ({"dict": {"keys": ["a", "a"], "values": [{"leaf": 0}, {"leaf": 1}]}}, 2, "repeated keys"),
        ({"dict": {"keys": [], "values": [], "code": "x"}}, 0, "expected an object"),
        ({"namedtuple": {"name": "P", "fields": ["_a"], "values": [{"leaf": 0}]}}, 1, "cannot start with '_'"),
        ({"namedtuple": {"name": "P", "fields": ["class"], "values": [{"leaf": 0}]}}, 1, "keywords"),
        ({"namedtuple": {"name": "os.system", "fields": [], "values": []}}, 0, "name must be a Python name"),
        ({"namedtuple": {"name": "P", "fields": ["a b"], "values": [{"leaf": 0}]}}, 1, "identifiers"),
        ({"model_output": {"class": "__import__('os')", "keys": [], "values": []}}, 0, "dotted Python name"),
        ({"model_output": {"class": "transformers.X", "keys": [1], "values": [{"leaf": 0}]}}, 1, "identifiers"),
    ],
)
def test_malformed_structures_are_named(structure, n, message):
    with pytest.raises(ValueError, match=message):
        validate_structure(structure, n)


def test_valid_structure_passes():
    validate_structure(GOOD, 2)
    assert build_structure(GOOD, ["x", "y"]) == {"a": "y", 3: ["x", ()]}


@pytest.mark.parametrize("depth", [specs.MAX_STRUCTURE_DEPTH + 1, 100_000])
def test_deep_nesting_is_a_value_error_not_a_recursion_error(depth):
    node = {"leaf": 0}
    for _ in range(depth):
        node = {"list": [node]}
    with pytest.raises(ValueError, match="deeper than"):
        validate_structure(node, 1)


def test_nesting_at_the_limit_is_accepted():
    node = {"leaf": 0}
    for _ in range(specs.MAX_STRUCTURE_DEPTH):
        node = {"tuple": [node]}
    validate_structure(node, 1)
    assert build_structure(node, [7]) is not None


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 5) | st.sampled_from(
        ["leaf", "list", "tuple", "dict", "namedtuple", "model_output", "keys", "values", "fields", "name",
         "class", "a", "_b", "transformers.modeling_outputs.BaseModelOutput", "os.system"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["leaf", "list", "tuple", "dict", "namedtuple", "model_output", "keys", "values",
                         "fields", "name", "class", "module"]), kids, max_size=3),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(_json, st.integers(0, 4))
def test_any_json_either_validates_and_builds_or_is_a_value_error(structure, n):
    try:
        validate_structure(structure, n)
    except ValueError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_structure(structure, list(range(n)))
