"""Post-training quantization (build side): calibration, Q/DQ placement, the accuracy guard.

    table = calibrate(graph, batches, method="entropy", fmt="int8")   # per-tensor activation ranges
    qgraph = insert_qdq(graph, table)                                 # simulated int8 (CPU reference)
    qgraph, report = accuracy_guard(graph, table, held_back, "cosine>=0.999")

The quantize/dequantize ops themselves live on the runtime side, in kiln.ops.quant.
"""

from kiln.ops.quant import FORMATS, FP8_E4M3, INT8, QuantFormat, quant_format
from kiln.quant.calibrate import calibrate
from kiln.quant.calibrators import CALIBRATORS, make_calibrator
from kiln.quant.guard import GuardReport, Target, accuracy_guard, compare_outputs, parse_targets
from kiln.quant.insert import insert_qdq
from kiln.quant.params import CalibrationTable, ChannelQuant, TensorQuant
from kiln.quant.sites import QUANT_RULES, Site, find_sites, register_rule

__all__ = [
    "CALIBRATORS",
    "FORMATS",
    "FP8_E4M3",
    "INT8",
    "QUANT_RULES",
    "CalibrationTable",
    "ChannelQuant",
    "GuardReport",
    "QuantFormat",
    "Site",
    "Target",
    "TensorQuant",
    "accuracy_guard",
    "calibrate",
    "compare_outputs",
    "find_sites",
    "insert_qdq",
    "make_calibrator",
    "parse_targets",
    "quant_format",
    "register_rule",
]
