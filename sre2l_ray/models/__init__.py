"""Model registry: ``create_model(name, num_classes, in_channels, image_size, ...)``."""

from sre2l_ray.models.registry import create_model, list_models, load_state_dict

__all__ = ["create_model", "list_models", "load_state_dict"]
