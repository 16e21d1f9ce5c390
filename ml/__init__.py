"""Kiln's pure-PyTorch core: models, data, the train loop, checkpoints, evaluation.

Kept light on purpose: importing ``ml`` loads nothing heavy; import the submodules
(``ml.train``, ``ml.models``, ...) you need. Depends on ``configs`` only, never on
worker/web/flask/celery.
"""
