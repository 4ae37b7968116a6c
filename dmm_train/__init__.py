"""Training side of dmm-deploy: config, model, data, train loop, evaluation.

Kept free of heavy imports at package level so that ``dmm_train.errors`` and
``dmm_train.config`` stay importable without torch.
"""
