"""Pretraining objectives: one module per objective, each owning its heads and returning named losses.

Order matters only for sharing: ITC runs first and leaves its similarities for ITM's hard negatives; MGSC and MLTC
share the masked fusion passes A and B (whichever runs first computes them).
"""
from models.objectives.glscl import MGSC, MLTC, MgscConfig, MltcConfig
from models.objectives.itc import ITC, ItcConfig
from models.objectives.itm import ITM, ItmConfig
from models.objectives.mlm import MLM, MlmConfig

OBJECTIVE_CONFIGS = {"itc": ItcConfig, "itm": ItmConfig, "mlm": MlmConfig, "mgsc": MgscConfig, "mltc": MltcConfig}
OBJECTIVE_ORDER = ("itc", "itm", "mlm", "mgsc", "mltc")
