"""Every error mpqc raises on bad input derives from :class:`MpqcError` and names what is wrong."""


class MpqcError(Exception):
    """Base class: an mpqc error whose message names the layer, op, argument or file at fault."""


class CaptureError(MpqcError):
    """The model could not be traced into a graph (both torch.fx and torch.export failed). ``torch_log`` holds what
    torch printed or logged while it tried (kept off stderr)."""

    torch_log: str = ""


class ExampleInputError(MpqcError):
    """The example inputs do not run through the model."""


class ConfigError(MpqcError, ValueError):
    """An argument or configuration value is invalid (unknown method, bad bit range, bad budget string, ...)."""


class InfeasibleBudgetError(MpqcError, ValueError):
    """The requested budget is below the smallest cost the search space allows."""


class DataError(MpqcError, ValueError):
    """Training or validation data is missing, empty, or inconsistent with the model."""


class UnsupportedOpError(MpqcError):
    """One or more graph nodes use an op a stage cannot handle; the message lists every one of them."""


class CheckpointError(MpqcError):
    """A checkpoint or run directory is missing, corrupt, or belongs to a different run."""


class TrainingDivergedError(MpqcError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TaskError(ConfigError):
    """The task's own callables (``forward``, ``loss``, ``metric``) failed or returned something unusable; the
    message names the callable, the phase and the batch or step."""
