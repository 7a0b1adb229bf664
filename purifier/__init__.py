"""Purifier: defend served classifiers against membership inference, and audit them.

The library is importable without grpc and never imports the sidecar (`purifier_server`).
"""

__version__ = "0.1.0"
