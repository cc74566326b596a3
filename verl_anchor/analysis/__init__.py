"""The analysis toolkit (paper §4): look at the preplan-and-anchor rhythm in a model's own responses.

* `report` (`verl-anchor analyze`): per-token WAAD / FAI / entropy, head groups and attention maps
  of each response, as an HTML report with figures, JSON and CSV.
* `coupling` (`verl-anchor coupling`): the paper's Table 2 statistics over a set of prompts.
* `perturb` (`verl-anchor perturb`): the paper's Table 1 anchor-perturbation study.

`common` holds what they share: model and prompt loading, generation, and the one captured
forward per response that yields every signal (`Session`, `ResponseAnalysis`).
"""
