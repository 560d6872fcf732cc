"""Problems and prompts: loading every problem format into one record, the synthetic tool tasks, prompt
templates, the training sampler, and each problem's reward history (LIMR's input). torl/prepare/ builds the
training files.
"""
