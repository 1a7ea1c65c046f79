"""Evaluation tasks. Each task returns a results dict in the shared format:

`{"task", "model", "results": [{"steps", "exit_policy", "exit_threshold", "accuracy", "mean_steps", "n"}, ...]}`
"""
