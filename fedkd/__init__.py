"""fedkd: a data-free and federated knowledge-distillation simulator on Flower and PyTorch."""

__version__ = "0.1.0"
