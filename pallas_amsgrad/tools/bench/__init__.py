"""`pallas-amsgrad bench`: one AMSGrad step against optax, torch and the roofline.

`contenders` (what runs), `measure` (timing each beside the roofline),
`report` (table, JSON, plot, `--compare`); workloads come from
`pallas_amsgrad.tools.workloads`.
"""
