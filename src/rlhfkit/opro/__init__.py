"""The LLM as optimiser (OPRO, Yang et al. 2023): the loop, its tasks and baselines, its report.

`loop` runs the paper's optimisation loop over any `rlhfkit.chat.llm.LLM`; `linreg` and `tsp` are the paper's
first two tasks, each with an exact optimum; `report` writes report.html.
"""
