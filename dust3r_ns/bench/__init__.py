"""Rerunnable benchmarks (`dust3r-ns bench ...`): each reports ratios against a baseline measured in the same run."""
