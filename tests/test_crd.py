"""The CRD and the spec model agree: same fields, same bounds, same verdict on a corpus."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from apiserver import CRD_PATH, crd, spec_schema, validate_spec

from mloptimizer.crd import crd_yaml
from mloptimizer.loading import SpecError, parse_search
from mloptimizer.spec import ArchitectureSearchSpec

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))

MINIMAL: dict[str, Any] = {"dataset": {"builtin": "digits"}}


def with_(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (the minimal spec) with ``value`` set at dotted ``path``."""
    spec = copy.deepcopy(base if base is not None else MINIMAL)
    node = spec
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


def model_errors(spec: dict[str, Any]) -> list[str]:
    try:
        parse_search(spec)
    except SpecError as error:
        return [str(issue) for issue in error.issues]
    return []


VALID: list[dict[str, Any]] = [
    MINIMAL,
    with_("workers", {"trainersPerGpu": 4, "resources": {"gpu": 1}}),
    with_("workers", {"trainersPerGpu": "auto", "resources": {"gpu": 2}}),
    with_("dataset", {"imageFolder": {"path": "/data/road"}}),
    with_(
        "dataset",
        {
            "imageFolder": {
                "claimName": "imgs",
                "path": "x",
                "imageSize": [28, 28],
                "colorMode": "grayscale",
                "validationSplit": 0.5,
                "testSplit": 0,
            }
        },
    ),
    with_("objective", {"metric": "val_loss", "direction": "minimize", "target": 0.05}),
    with_("objective", {"metric": "val_accuracy", "target": 1}),
    with_("budget", {"maxTrials": 3, "parallelism": 3, "timeout": "1h30m", "maxCostUSD": 2}),
    with_("sampler", {"type": "random", "seed": 0}),
    with_("sampler", {"multivariate": False, "group": False, "constantLiar": False}),
    with_("pruner", {"type": "hyperband", "minEpochs": 2}, with_("training.epochs", 9)),
    with_("training", {"epochs": 5, "refine": {"topK": 20, "epochs": 6}}),
    with_(
        "searchSpace",
        {"architectures": ["inception"], "learningRate": {"min": 0.001, "max": 0.001}},
    ),
    with_(
        "searchSpace.cnn",
        {
            "blocks": {"min": 2, "max": 2},
            "kernelSizes": [7],
            "filters": {"min": 8, "max": 64, "step": 8},
        },
    ),
    with_(
        "workers",
        {
            "minReplicas": 2,
            "maxReplicas": 2,
            "pricePerHour": 0,
            "resources": {"gpu": 2, "cpu": "1500m", "memory": "16Gi"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
        },
    ),
    with_(
        "workers.gpuPool",
        {
            "apiKeySecretRef": {"name": "v", "key": "k"},
            "joinSecretRef": {"name": "k3s"},
            "interruptible": True,
            "bidPricePerHour": 0.2,
        },
    ),
    with_(
        "workers.gpuPool",
        {
            "mode": "Direct",
            "apiKeySecretRef": {"name": "v", "key": "k"},
            "brokerEndpoint": "amqps://broker.example.com:5671/",
        },
    ),
    with_(
        "workers.gpuPool",
        {
            "apiKeySecretRef": {"name": "v", "key": "k"},
            "joinSecretRef": {"name": "k3s"},
            "capacity": "Auto",
        },
    ),
    with_(
        "workers.gpuPool",
        {
            "apiKeySecretRef": {"name": "v", "key": "k"},
            "joinSecretRef": {"name": "k3s"},
            "capacity": "Interruptible",
            "bidPricePerHour": 0.2,
        },
    ),
    *(yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES),
    with_("objective", {"tradeoff": "modelKB", "constraints": {"maxModelKB": 64}}),
    with_("output.formats", ["savedmodel", "tflite-float16", "tflite-int8"]),
]

# (why it is wrong, spec, path both sides must name)
NODE_POOL = {"apiKeySecretRef": {"name": "v", "key": "k"}, "joinSecretRef": {"name": "k3s"}}

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no dataset", {}, "spec"),
    ("both datasets", with_("dataset.imageFolder", {"path": "p"}), "spec.dataset"),
    ("neither dataset", with_("dataset", {"seed": 1}), "spec.dataset"),
    ("unknown builtin", with_("dataset.builtin", "imagenet"), "spec.dataset.builtin"),
    (
        "folder without path",
        with_("dataset", {"imageFolder": {"claimName": "c"}}),
        "spec.dataset.imageFolder",
    ),
    (
        "image size of three",
        with_("dataset", {"imageFolder": {"path": "p", "imageSize": [9, 9, 9]}}),
        "spec.dataset.imageFolder.imageSize",
    ),
    (
        "tiny image",
        with_("dataset", {"imageFolder": {"path": "p", "imageSize": [4, 4]}}),
        "spec.dataset.imageFolder.imageSize",
    ),
    (
        "splits leave nothing",
        with_("dataset", {"imageFolder": {"path": "p", "validationSplit": 0.6, "testSplit": 0.4}}),
        "spec.dataset.imageFolder.validationSplit",
    ),
    (
        "zero validation",
        with_("dataset", {"imageFolder": {"path": "p", "validationSplit": 0}}),
        "spec.dataset.imageFolder.validationSplit",
    ),
    ("unknown metric", with_("objective.metric", "f1"), "spec.objective.metric"),
    (
        "loss maximised",
        with_("objective", {"metric": "val_loss", "direction": "maximize"}),
        "spec.objective.direction",
    ),
    ("accuracy target above 1", with_("objective.target", 1.5), "spec.objective.target"),
    ("zero trials", with_("budget.maxTrials", 0), "spec.budget.maxTrials"),
    (
        "parallelism above trials",
        with_("budget", {"maxTrials": 4, "parallelism": 5}),
        "spec.budget.parallelism",
    ),
    ("negative failures", with_("budget.maxFailedTrials", -1), "spec.budget.maxFailedTrials"),
    ("bad timeout", with_("budget.timeout", "2 hours"), "spec.budget.timeout"),
    ("zero cost cap", with_("budget.maxCostUSD", 0), "spec.budget.maxCostUSD"),
    ("string trials", with_("budget.maxTrials", "20"), "spec.budget.maxTrials"),
    ("typo in budget", with_("budget.maxTrails", 20), "spec.budget"),
    ("unknown sampler", with_("sampler.type", "cmaes"), "spec.sampler.type"),
    ("zero EI candidates", with_("sampler.nEICandidates", 0), "spec.sampler.nEICandidates"),
    ("group without multivariate", with_("sampler.multivariate", False), "spec.sampler.group"),
    ("string bool", with_("sampler.constantLiar", "yes"), "spec.sampler.constantLiar"),
    ("unknown pruner", with_("pruner.type", "asha"), "spec.pruner.type"),
    (
        "hyperband without rungs",
        with_("pruner", {"type": "hyperband", "minEpochs": 10}),
        "spec.pruner",
    ),
    ("reduction factor 1", with_("pruner.reductionFactor", 1), "spec.pruner.reductionFactor"),
    ("zero epochs", with_("training.epochs", 0), "spec.training.epochs"),
    ("unquoted off", with_("training.mixedPrecision", False), "spec.training.mixedPrecision"),
    (
        "refine no longer",
        with_("training", {"epochs": 10, "refine": {"epochs": 10}}),
        "spec.training.refine",
    ),
    (
        "refine more than trials",
        with_("training.refine", {"topK": 5}, with_("budget.maxTrials", 4)),
        "spec.training",
    ),
    ("no architectures", with_("searchSpace.architectures", []), "spec.searchSpace.architectures"),
    (
        "unknown architecture",
        with_("searchSpace.architectures", ["resnet"]),
        "spec.searchSpace.architectures",
    ),
    (
        "architecture twice",
        with_("searchSpace.architectures", ["cnn", "cnn"]),
        "spec.searchSpace.architectures",
    ),
    (
        "blocks min above max",
        with_("searchSpace.cnn.blocks", {"min": 5, "max": 2}),
        "spec.searchSpace.cnn.blocks.min",
    ),
    (
        "step does not divide",
        with_("searchSpace.cnn.filters", {"min": 16, "max": 100, "step": 16}),
        "spec.searchSpace.cnn.filters.step",
    ),
    ("even kernel", with_("searchSpace.cnn.kernelSizes", [4]), "spec.searchSpace.cnn.kernelSizes"),
    (
        "log range from zero",
        with_("searchSpace.learningRate", {"min": 0, "max": 0.1, "log": True}),
        "spec.searchSpace.learningRate.min",
    ),
    (
        "dropout above 1",
        with_("searchSpace.dropout", {"min": 0.1, "max": 1.5}),
        "spec.searchSpace.dropout.max",
    ),
    (
        "unknown head",
        with_("searchSpace.classifier.types", ["gap", "svm"]),
        "spec.searchSpace.classifier.types",
    ),
    ("sharing GPUs without one", with_("workers", {"trainersPerGpu": 2}), "spec.workers"),
    (
        "nine trainers a GPU",
        with_("workers", {"trainersPerGpu": 9, "resources": {"gpu": 1}}),
        "spec.workers.trainersPerGpu",
    ),
    (
        "a quoted share",
        with_("workers", {"trainersPerGpu": "2", "resources": {"gpu": 1}}),
        "spec.workers.trainersPerGpu",
    ),
    (
        "workers min above max",
        with_("workers", {"minReplicas": 3, "maxReplicas": 1}),
        "spec.workers.minReplicas",
    ),
    ("bad memory", with_("workers.resources", {"memory": "lots"}), "spec.workers.resources.memory"),
    (
        "bad toleration operator",
        with_("workers.tolerations", [{"key": "k", "operator": "In"}]),
        "spec.workers.tolerations[0].operator",
    ),
    (
        "non-string node label",
        with_("workers.nodeSelector", {"gpu": True}),
        "spec.workers.nodeSelector.gpu",
    ),
    (
        "pool and price",
        with_(
            "workers",
            {"pricePerHour": 1.0, "gpuPool": NODE_POOL},
        ),
        "spec.workers.pricePerHour",
    ),
    ("pool without key", with_("workers.gpuPool", {"gpuName": "RTX 3090"}), "spec.workers.gpuPool"),
    (
        "bid without interruptible",
        with_(
            "workers.gpuPool",
            {**NODE_POOL, "bidPricePerHour": 0.1},
        ),
        "spec.workers.gpuPool.bidPricePerHour",
    ),
    (
        "bid under capacity OnDemand",
        with_("workers.gpuPool", {**NODE_POOL, "capacity": "OnDemand", "bidPricePerHour": 0.1}),
        "spec.workers.gpuPool.bidPricePerHour",
    ),
    (
        "capacity Interruptible without a bid",
        with_("workers.gpuPool", {**NODE_POOL, "capacity": "Interruptible"}),
        "spec.workers.gpuPool.bidPricePerHour",
    ),
    (
        "interruptible contradicting capacity",
        with_("workers.gpuPool", {**NODE_POOL, "interruptible": True, "capacity": "Auto"}),
        "spec.workers.gpuPool.capacity",
    ),
    (
        "unknown capacity",
        with_("workers.gpuPool", {**NODE_POOL, "capacity": "Spot"}),
        "spec.workers.gpuPool.capacity",
    ),
    (
        "bid above cap",
        with_(
            "workers.gpuPool",
            {
                **NODE_POOL,
                "interruptible": True,
                "bidPricePerHour": 0.9,
                "maxPricePerHour": 0.5,
            },
        ),
        "spec.workers.gpuPool.bidPricePerHour",
    ),
    (
        "unknown pool mode",
        with_("workers.gpuPool", {"apiKeySecretRef": {"name": "v", "key": "k"}, "mode": "Ssh"}),
        "spec.workers.gpuPool.mode",
    ),
    (
        "node pool without join secret",
        with_("workers.gpuPool", {"apiKeySecretRef": {"name": "v", "key": "k"}}),
        "spec.workers.gpuPool.joinSecretRef",
    ),
    (
        "direct pool without broker endpoint",
        with_("workers.gpuPool", {"apiKeySecretRef": {"name": "v", "key": "k"}, "mode": "Direct"}),
        "spec.workers.gpuPool.brokerEndpoint",
    ),
    (
        "direct pool with credentials in the endpoint",
        with_(
            "workers.gpuPool",
            {
                "apiKeySecretRef": {"name": "v", "key": "k"},
                "mode": "Direct",
                "brokerEndpoint": "amqps://guest:guest@broker:5671/",
            },
        ),
        "spec.workers.gpuPool.brokerEndpoint",
    ),
    ("secret without key", with_("storage.secretRef", {"name": "db"}), "spec.storage.secretRef"),
    ("unknown export format", with_("output.formats", ["onnx"]), "spec.output.formats[0]"),
    ("export format twice", with_("output.formats", ["keras", "keras"]), "spec.output.formats"),
    ("unknown tradeoff", with_("objective.tradeoff", "latency"), "spec.objective.tradeoff"),
    (
        "output to both a pvc and s3",
        with_(
            "output",
            {
                "pvc": {"claimName": "models"},
                "s3": {
                    "endpoint": "https://s3.example.com",
                    "bucket": "models",
                    "secretRef": {"name": "bucket"},
                },
            },
        ),
        "spec.output.s3",
    ),
    (
        "output path leaving the claim",
        with_("output.pvc", {"claimName": "models", "path": "../../etc"}),
        "spec.output.pvc.path",
    ),
    (
        "s3 endpoint with a path",
        with_(
            "output.s3",
            {
                "endpoint": "https://s3.example.com/bucket",
                "bucket": "models",
                "secretRef": {"name": "bucket"},
            },
        ),
        "spec.output.s3.endpoint",
    ),
    (
        "output pvc with trainers on rented machines",
        {
            **with_("output.pvc", {"claimName": "models"}),
            "workers": {
                "gpuPool": {
                    "mode": "Direct",
                    "apiKeySecretRef": {"name": "v", "key": "k"},
                    "brokerEndpoint": "amqps://broker.example.com:5671/",
                }
            },
        },
        "spec.output",
    ),
]


def test_corpus_is_big_enough() -> None:
    assert len(VALID) >= 10
    assert len(INVALID) >= 30


@pytest.mark.parametrize("spec", VALID, ids=range(len(VALID)))
def test_valid_specs_pass_both(spec: dict[str, Any]) -> None:
    assert validate_spec(spec) == []
    assert model_errors(spec) == []


@pytest.mark.parametrize(
    ("spec", "path"), [(s, p) for _, s, p in INVALID], ids=[why for why, _, _ in INVALID]
)
def test_invalid_specs_fail_both_at_the_same_field(spec: dict[str, Any], path: str) -> None:
    server = validate_spec(spec)
    model = model_errors(spec)
    assert any(e.startswith(path) for e in server), server
    assert any(e.startswith(path) for e in model), model


def test_committed_crd_is_the_generated_one() -> None:
    assert CRD_PATH.read_text() == crd_yaml(), (
        "crds/architecturesearch.yaml is stale: run `mloptimizer crd > "
        "crds/architecturesearch.yaml`"
    )


# --- field sets, bounds, enums and defaults, read independently from both sides -----------


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline pydantic's $ref and unwrap Optional's anyOf-with-null."""
    if "$ref" in schema:
        ref = defs[schema["$ref"].split("/")[-1]]
        return _resolve({**ref, **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
    options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return _resolve({**options[0], **rest}, defs)
    return schema


def _facts_from_pydantic(
    schema: dict[str, Any], defs: dict[str, Any], path: str, out: dict[str, tuple[Any, ...]]
) -> None:
    schema = _resolve(schema, defs)
    lower = schema.get("minimum", schema.get("exclusiveMinimum"))
    upper = schema.get("maximum", schema.get("exclusiveMaximum"))
    enum = schema.get("enum") or ([schema["const"]] if "const" in schema else None)
    kind = schema.get("type")
    out[path] = (
        kind,
        lower,
        upper,
        "exclusiveMinimum" in schema,
        enum,
        schema.get("minLength", schema.get("minItems")),
        schema.get("maxLength", schema.get("maxItems")),
        schema.get("pattern"),
    )
    for key, sub in schema.get("properties", {}).items():
        _facts_from_pydantic(sub, defs, f"{path}.{key}", out)
    if kind == "array":
        _facts_from_pydantic(schema["items"], defs, f"{path}[]", out)


def _facts_from_crd(schema: dict[str, Any], path: str, out: dict[str, tuple[Any, ...]]) -> None:
    kind = schema.get("type")
    enum = schema.get("enum")
    out[path] = (
        kind,
        schema.get("minimum"),
        schema.get("maximum"),
        bool(schema.get("exclusiveMinimum")),
        enum,
        schema.get("minLength", schema.get("minItems")),
        schema.get("maxLength", schema.get("maxItems")),
        schema.get("pattern"),
    )
    for key, sub in schema.get("properties", {}).items():
        _facts_from_crd(sub, f"{path}.{key}", out)
    if kind == "array":
        _facts_from_crd(schema["items"], f"{path}[]", out)


def test_fields_and_bounds_match_pydantics_own_schema() -> None:
    """pydantic's JSON schema (not our generator) against the committed CRD, field by field."""
    generated = ArchitectureSearchSpec.model_json_schema(by_alias=True)
    ours: dict[str, tuple[Any, ...]] = {}
    _facts_from_pydantic(generated, generated.get("$defs", {}), "spec", ours)
    theirs: dict[str, tuple[Any, ...]] = {}
    _facts_from_crd(spec_schema(), "spec", theirs)
    assert sorted(ours) == sorted(theirs)
    mismatched = {p: (ours[p], theirs[p]) for p in ours if ours[p] != theirs[p]}
    assert mismatched == {}


def test_defaults_match_the_model() -> None:
    """The API server's defaulting and the model's defaults give the same spec."""
    from apiserver import apply_defaults

    server = apply_defaults(spec_schema(), copy.deepcopy(MINIMAL))
    model = ArchitectureSearchSpec.model_validate(MINIMAL).model_dump(
        by_alias=True, exclude_none=True
    )
    assert server == model


def test_every_field_is_described_and_printer_columns_exist() -> None:
    def walk(schema: dict[str, Any], path: str) -> None:
        for key, sub in schema.get("properties", {}).items():
            assert sub.get("description"), f"{path}.{key} has no description"
            walk(sub, f"{path}.{key}")
        if "items" in schema:
            walk(schema["items"], f"{path}[]")

    walk(spec_schema(), "spec")
    version = crd()["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Trials", "Best", "Workers", "Cost", "Age"]
    assert version["subresources"] == {"status": {}}
    assert crd()["spec"]["names"]["shortNames"] == ["archsearch"]
