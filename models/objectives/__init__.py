"""The objective registry: config name -> Objective class. Adding an objective = its own file + one entry here.

Registry order is the build order (it decides the random init of the heads) and the run order among objectives that
do not depend on each other; an objective that publishes a shared pass always runs before those reading it.
"""
from models.objectives.base import Objective
from models.objectives.glscl import MGSC, MLTC
from models.objectives.ita import ITA
from models.objectives.itc import ITC
from models.objectives.itm import ITM
from models.objectives.mlm import MLM
from models.objectives.semmim import SemMIM
from models.objectives.simla import PSL, XmmImage, XmmText

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (ITC, ITA, ITM, MLM, MGSC, MLTC, XmmText, XmmImage,
                                                                    PSL, SemMIM)}

from models.tasks import retrieval as _rank  # noqa: E402,F401  registers "rank" (models/tasks/retrieval.py, its end)
