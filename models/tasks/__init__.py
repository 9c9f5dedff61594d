"""Downstream task models: the shared backbone plus one task head, no pretraining objective (models/tasks/base.py).
Heads for VQA, NLVR2, SNLI-VE, retrieval re-ranking and grounding go in one file each beside it."""
