"""Evaluation. Each task returns a results dict in the shared format:

`{"task", "model", "results": [{"steps", "exit_policy", "exit_threshold", "accuracy", "mean_steps", "n"}, ...]}`

- `arithmetic.py`: the held-out arithmetic task of the tiny trained model.
- `tasks.py`: benchmark data (pinned PyPI packages) -> items and prompts.
- `loglik.py`: continuation log-likelihoods for every loop count and exit policy from one pass.
- `harness.py`: configurations, resumable per-item JSONL records, shards, merge, results.
- `scoring.py`: answer extraction and math-verify equivalence; `code_exec.py`: HumanEval runs.
- `report.py`: the rich table and the accuracy-vs-steps PNG.
- `lm_eval_adapter.py`: the `looplm` model type for lm-evaluation-harness (optional dependency).
"""
