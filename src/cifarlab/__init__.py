"""cifarlab: a Lightning + Hydra training library for image classification on CIFAR-10."""

__version__ = "0.1.0"
