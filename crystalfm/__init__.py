"""crystalfm: one console script over the stages data_pipeline → pretrain → finetune → discovery,
and `crystalfm.load(path_or_models_uri)` for use from Python (see crystalfm/_api.py)."""
from crystalfm_common.provenance import package_version

__version__ = package_version()


def load(source, *, tracking_uri=None, device="cpu", batch_size=64):
    """A release directory, a fine-tuned model directory or an MLflow `models:/NAME@ALIAS` URI, as an
    object with `embed(structures)` (and `predict(structures)` for fine-tuned models)."""
    from crystalfm._api import load as _load  # torch and the models load only when asked

    return _load(source, tracking_uri=tracking_uri, device=device, batch_size=batch_size)


__all__ = ["load", "__version__"]
