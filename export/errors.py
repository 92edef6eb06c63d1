"""Errors a user can cause in `export`: one line that names the file, row or parameter."""


class ExportError(Exception):
    """Base of every user-facing export error; the CLI prints its message without a traceback."""


class BundleIntegrityError(ExportError):
    """A bundle's manifest is unreadable, or a listed file is missing or has another sha256."""


class BundleNotFoundError(ExportError):
    """A bundle reference names no bundle, or a model that has no promoted version yet."""


class PromotionError(ExportError):
    """A bundle may not become the current version (parity missing or failed)."""


class ParityError(ExportError):
    """An export computes something other than the eager model beyond the tolerances.

    ``bundle_path`` and ``report`` (a ``ParityReport``) let a caller inspect the written bundle.
    """

    def __init__(self, message: str, bundle_path: object = None, report: object = None) -> None:
        super().__init__(message)
        self.bundle_path = bundle_path
        self.report = report


class ConversionError(ExportError):
    """A model could not be converted to a required format (TorchScript or ONNX)."""


class ManifestError(ExportError):
    """A manifest field a scorer or exporter needs is missing or has a value it cannot use."""


class BundleSignatureError(BundleIntegrityError):
    """A bundle's signature is missing where one is required, or does not verify with the key."""


class SigningKeyError(ExportError):
    """A signing or verify key file is missing, unreadable or not an Ed25519 PEM key."""


class SigningSettingError(ExportError):
    """A signing setting (``LENSFLOW_REQUIRE_SIGNED``) holds a value it does not define."""


class GraphMismatchError(ManifestError):
    """The manifest describes a graph input the exported graph does not take (e.g. its size)."""
