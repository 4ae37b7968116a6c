"""Calibration data readers, Q/DQ insertion and accuracy reports."""
