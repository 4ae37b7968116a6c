"""Calibration data and feeds (data), Q/DQ insertion (qdq), accuracy reports (accuracy) and the int8 pass (int8)."""
