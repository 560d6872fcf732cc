"""One trajectory through the tool loop: the TIR protocol, the loop's state machine, the records that
cross actor boundaries, per-request sampling overrides, and the metrics the trajectories give.
"""
