"""Grounded training data from scans, label maps and reports."""
