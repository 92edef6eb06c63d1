"""The words training options accept for choices the fit implements: LR-finder rules, LR
schedules and where a new head starts.

They live here, apart from the torch code that implements them, so the option declarations (and
with them ``lensflow --help`` and every one-line refusal of a bad option) load without importing
torch, which costs seconds per process. The modules that implement the choices dispatch on these
words; tests/training/test_fine_tune.py checks the finder rules against ``SUGGESTERS``.
"""

#: LR-finder suggestion rules (``training.fit.lr_finder.SUGGESTERS``).
FINDER_RULES = ("valley", "steep", "minimum", "slide")
#: LR schedules of a fit (``training.fit.schedule``).
SCHEDULES = ("one_cycle", "sgdr")
#: Where a linear head starts (``training.models.head_init``).
HEAD_INITS = ("auto", "probe", "classifier", "random")
