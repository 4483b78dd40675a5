"""The calibrator: exponents for every tensor from a calibration set.

The engine (:mod:`espquant.calibration.engine`: ``calibrate_model``, ``CalibrationResult``) sits above the
simulator, because its ``auto`` method measures candidate tables on the simulated chip; the modules it builds on
(the plan, observers, exponent rules, data handling) sit below it, where the simulator reads them.
"""
