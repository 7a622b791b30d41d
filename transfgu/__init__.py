"""TransFGU: top-down fine-grained unsupervised semantic segmentation."""
__version__ = "0.1.0"
