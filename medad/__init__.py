"""medad: unsupervised anomaly detection by generative restoration, built on MONAI."""

__version__ = "0.1.0"
