"""Model specs and loading: build a frozen, BN-converted `ModelHandle` from local files only."""

from adapters.models.loading import ModelSpec, build_classifier, build_handle, build_network, load_checkpoint

__all__ = ["ModelSpec", "build_classifier", "build_handle", "build_network", "load_checkpoint"]
