"""lensflow export: model bundles, format conversions and the parity gate.

``export.bundle`` (write/read/verify/resolve/promote bundles) imports no ML library, so scoring
can use it cheaply; ``export.convert.export_bundle`` is the one call from an eager model to a
checked bundle; ``export.parity.check_bundle`` re-runs the gate from a bundle alone.
"""
