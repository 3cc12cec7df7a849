"""Tissue codes of the phantom and their attenuation (HU).

Rendering paints small integer codes and maps them to HU through a per-patient lookup table at the
end; that is much cheaper than painting floats, and the code map doubles as an organ label map.
"""

from __future__ import annotations

import logging
from enum import IntEnum

import numpy as np

log = logging.getLogger(__name__)

HU_MIN, HU_MAX = -1024, 3071


class T(IntEnum):
    """Tissue codes (uint8). Codes >= ``FIRST_FINDING_CODE`` belong to planted findings."""

    AIR = 0
    TABLE = 1
    SUBCUT_FAT = 2
    MUSCLE = 3
    CORTICAL = 4
    MARROW = 5
    CARTILAGE = 6
    DISC = 7
    CORD = 8
    MED_FAT = 9
    LUNG_R = 10
    LUNG_L = 11
    AIRWAY_LUMEN = 12
    AIRWAY_WALL = 13
    VESSEL = 14
    AORTA = 15
    HEART_BLOOD = 16
    MYOCARDIUM = 17
    EPICARDIAL_FAT = 18
    PERICARDIUM = 19
    PERICARDIAL_FLUID = 20
    CORONARY = 21
    ESOPHAGUS = 22
    ESOPHAGUS_AIR = 23
    LIVER = 24
    SPLEEN = 25
    STOMACH_WALL = 26
    STOMACH_GAS = 27
    STOMACH_FLUID = 28
    ABDOMEN = 29
    TABLE_CORE = 30
    SKIN = 31
    PULM_ARTERY = 32
    METAL = 33


FIRST_FINDING_CODE = 64

#: Codes that count as lung parenchyma for placing/painting parenchymal findings.
LUNG_CODES = (T.LUNG_R, T.LUNG_L)

#: Blood-pool codes that enhance with IV contrast.
BLOOD_CODES = (T.VESSEL, T.AORTA, T.HEART_BLOOD, T.CORONARY, T.PULM_ARTERY)


def base_hu_table(
    *,
    fat: float,
    muscle: float,
    blood: float,
    lung: float,
    cortical: float,
    marrow: float,
    myocardium: float,
    liver: float,
    table: float,
    contrast_boost: float = 0.0,
) -> np.ndarray:
    """The per-patient HU of each base tissue code (float32, 256 entries; findings add theirs)."""
    hu = np.full(256, -1000.0, dtype=np.float32)
    values = {
        T.AIR: -1000.0,
        T.TABLE: table,
        T.TABLE_CORE: -850.0,
        T.SKIN: muscle - 10.0,
        T.SUBCUT_FAT: fat,
        T.MUSCLE: muscle,
        T.CORTICAL: cortical,
        T.MARROW: marrow,
        T.CARTILAGE: 130.0,
        T.DISC: 85.0,
        T.CORD: 25.0,
        T.MED_FAT: fat - 5.0,
        T.LUNG_R: lung,
        T.LUNG_L: lung,
        T.AIRWAY_LUMEN: -995.0,
        T.AIRWAY_WALL: 15.0,
        T.VESSEL: blood + contrast_boost,
        T.AORTA: blood + contrast_boost,
        T.HEART_BLOOD: blood + contrast_boost,
        T.CORONARY: blood + contrast_boost,
        T.PULM_ARTERY: blood + contrast_boost,
        T.METAL: float(HU_MAX),
        T.MYOCARDIUM: myocardium + 0.3 * contrast_boost,
        T.EPICARDIAL_FAT: fat,
        T.PERICARDIUM: 30.0 + 0.1 * contrast_boost,
        T.PERICARDIAL_FLUID: 10.0,
        T.ESOPHAGUS: 35.0 + 0.1 * contrast_boost,
        T.ESOPHAGUS_AIR: -990.0,
        T.LIVER: liver + 0.25 * contrast_boost,
        T.SPLEEN: liver - 8.0 + 0.35 * contrast_boost,
        T.STOMACH_WALL: 40.0 + 0.15 * contrast_boost,
        T.STOMACH_GAS: -995.0,
        T.STOMACH_FLUID: 12.0,
        T.ABDOMEN: 20.0 + 0.1 * contrast_boost,
    }
    for code, value in values.items():
        hu[int(code)] = value
    return hu
