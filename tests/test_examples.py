"""Every file in examples/ passes both the CRD (API server rules) and the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from apiserver import validate_spec

from mloptimizer.loading import load_search
from mloptimizer.space import space_size

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def test_the_examples_the_issue_asks_for_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "digits-quick.yaml",
        "mnist.yaml",
        "fashion-mnist.yaml",
        "cifar10.yaml",
        "custom-images.yaml",
        "edge-96x96.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid_for_the_api_server_and_the_model(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert document["apiVersion"] == "mloptimizer.io/v1alpha1"
    assert document["kind"] == "ArchitectureSearch"
    assert validate_spec(document["spec"]) == []
    search = load_search(path)
    assert search.name == document["metadata"]["name"]
    assert space_size(search.spec.search_space).discrete > 0


def test_cifar10_is_the_seeds_search() -> None:
    spec = load_search(EXAMPLES[0].parent / "cifar10.yaml").spec
    assert spec.budget.max_trials == 20
    assert spec.sampler.type == "tpe"
    assert spec.sampler.n_startup_trials == 5
    assert spec.training.refine is not None


def test_custom_images_is_96x96_rgb() -> None:
    folder = load_search(EXAMPLES[0].parent / "custom-images.yaml").spec.dataset.image_folder
    assert folder is not None
    assert folder.image_size == [96, 96]
    assert folder.color_mode == "rgb"


def test_edge_example_is_a_local_96x96_rgb_search_for_a_small_device() -> None:
    # tests/test_edge_example.py runs it end to end
    spec = load_search(EXAMPLES[0].parent / "edge-96x96.yaml").spec
    folder = spec.dataset.image_folder
    assert folder is not None
    assert folder.claim_name is None  # runnable with `mloptimizer run`, no cluster
    assert not Path(folder.path).is_absolute()  # next to the search file
    assert folder.image_size == [96, 96]
    assert folder.color_mode == "rgb"
    constraints = spec.objective.constraints
    assert constraints is not None
    assert constraints.max_model_kb == 256
    assert constraints.max_mflops is not None
    assert spec.search_space.classifier.types == ["gap"]
    assert spec.search_space.cnn.blocks.max <= 4
