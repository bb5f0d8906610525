"""Outputs conform to the JSON Schemas in Schemas/, and the sample policies to the policy schema."""
import json

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from conftest import REPO, metadata_doc, run

SCHEMAS = {p.name: json.load(open(p)) for p in (REPO / "Schemas").glob("*.schema.json")}
REGISTRY = Registry().with_resources(
    [(s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values()] +
    [(name, Resource.from_contents(s)) for name, s in SCHEMAS.items()])


def validator(name):
    schema = SCHEMAS[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=REGISTRY)


POLICIES = [REPO / "Samples" / "policy.cfg"] + sorted((REPO / "Samples" / "policies").glob("*.yaml"))


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_sample_policies_follow_the_schema(path):
    validator("policy.schema.json").validate(yaml.safe_load(open(path)) or {})


def test_schema_rejects_unknown_keys():
    v = validator("policy.schema.json")
    with pytest.raises(jsonschema.ValidationError):
        v.validate({"defaults": {"colour": "red"}})
    with pytest.raises(jsonschema.ValidationError):
        v.validate({"rules": [{"match": "*", "dtype": "int3"}]})


@pytest.mark.parametrize("policy", ["Samples/policy.cfg", "Samples/policies/w4-mlp-affine.yaml", "Samples/policies/fp8-select.yaml",
                                    "Samples/policies/percentile-entropy.yaml"])
def test_metadata_and_report_follow_their_schemas(tmp_path, policy):
    out = tmp_path / "o.safetensors"
    run(REPO / "Samples/tiny-transformer.safetensors", "-o", out, "--policy", REPO / policy, "--report", tmp_path / "r.json", "-q")
    doc, _ = metadata_doc(out)
    validator("metadata.schema.json").validate(doc)
    report = json.load(open(tmp_path / "r.json"))
    validator("report.schema.json").validate(report)
    assert report["totals"]["tensors"] == 22
    plan = json.loads(run("plan", REPO / "Samples/tiny-transformer.safetensors", "--policy", REPO / policy, "--json").stdout)
    validator("report.schema.json").validate(plan)
