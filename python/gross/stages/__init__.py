"""The pipeline's stages, one module each; every stage takes a `gross.experiment.Experiment`, writes its result
under the output folder and, when that result exists, loads it instead of running again.

`train.trained` → `decompose.decomposed` → `space.trained_space` → `search.search` /
`search.search_budgets` → `finetune.finetune`; `gross.reproduce` runs them all and reports.
`profile.profile` (the latency table, `latency.json`) needs only the architecture; a latency
budget (`profile.latency_budget`) needs its table.
"""
