"""Infrastructure: run storage and checkpoints, logs and progress, paths and devices, the preflight
estimate, and the weight buckets streamed from learner to engines.
"""
