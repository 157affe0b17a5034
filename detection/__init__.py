"""SPP-net object detection (He et al., 2014) in PyTorch."""
__version__ = "0.1.0"
