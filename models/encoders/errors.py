"""What goes wrong when an encoder is brought: each error says what came and how to fix it."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the encoder."""


class TimmError(CheckpointError):
    """An unknown timm architecture, or weights that do not fit it."""


class TorchScriptError(CheckpointError):
    """A file that is not a usable TorchScript encoder."""


class OutputCheckError(ValueError):
    """An encoder whose output is not a usable (N, r) representation."""


class OnnxError(CheckpointError):
    """A file that is not a usable ONNX encoder, or ONNX Runtime missing."""


class ExportProgramError(CheckpointError):
    """A file that is not a usable ``torch.export`` program (``.pt2``)."""


class RuntimeUnavailable(ValueError):
    """An inference engine that cannot run an encoder here (not installed, no export, outputs differ)."""
