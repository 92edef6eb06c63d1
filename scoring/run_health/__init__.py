"""Run health: profile every run while it scores, compare it with the trailing runs, and refuse
to commit one whose output drifted (``on_drift: fail``).

- :mod:`.profile`: counts and fixed-bin histograms that merge exactly across shards;
  :mod:`.image_profile` and :mod:`.rec_profile` gather them while shards score.
- :mod:`.drift`: PSI, Jensen–Shannon and a chi-square noise check per distribution.
- :mod:`.figures`: single numbers read off a profile (error rate, coverage, Gini, quantiles).
- :mod:`.gate`: the baseline (trailing run records) and the breaker's decision.
- :mod:`.table`: the ``run_health`` table; :mod:`.render`: text bars for terminals and artifacts.
"""
