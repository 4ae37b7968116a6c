"""Training side of dmm-deploy: config, model, data, train loop, evaluation.

Kept free of heavy imports at package level so that ``dmm_train.config`` stays
importable without torch.
"""
