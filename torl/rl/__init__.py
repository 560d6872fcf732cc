"""The RL math as pure functions: rewards (grading), GRPO advantages and losses, per-token log-probs,
token-budget micro-batching, and DAPO's dynamic sampling.
"""
