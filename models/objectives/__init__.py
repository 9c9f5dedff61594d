"""Pretraining objectives: one module per objective, each owning its heads and returning named losses.

Order matters only for sharing: ITC runs first and leaves its similarities for ITM's hard negatives.
"""
from models.objectives.itc import ITC, ItcConfig
from models.objectives.itm import ITM, ItmConfig
from models.objectives.mlm import MLM, MlmConfig

OBJECTIVE_CONFIGS = {"itc": ItcConfig, "itm": ItmConfig, "mlm": MlmConfig}
OBJECTIVE_ORDER = ("itc", "itm", "mlm")
