"""Serving /predict, one module per process: ``web_*`` run in every web process and never import torch,
``forward_*`` run in the host's forward process (the only web code that imports torch or ml.inference)."""
