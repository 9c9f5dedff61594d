"""Our top-level `datasets` package shares its name with Hugging Face's; the libraries must still import beside
it, and `import datasets` must resolve to ours."""
import importlib
from pathlib import Path


def test_third_party_imports_beside_our_datasets_package():
    import datasets
    import deepspeed  # noqa: F401
    import timm  # noqa: F401
    import transformers  # noqa: F401
    import webdataset  # noqa: F401

    repo = Path(__file__).resolve().parents[1]
    assert Path(datasets.__file__).resolve().parent == repo / "datasets"
    assert importlib.import_module("datasets.loader").build_train_loader
    assert importlib.import_module("datasets.config").DataConfig
