"""Error types. Everything neurontune raises on bad input derives from :class:`NeurontuneError`,
so the CLI can print one clear line instead of a traceback."""


class NeurontuneError(ValueError):
    """Base class for user-facing errors (bad input, bad files, bad configuration)."""


class TargetError(NeurontuneError):
    """A target module name/pattern matched nothing, or matched a module that cannot be tuned."""


class SpecError(NeurontuneError):
    """A NeuronSpec is malformed: unknown module, index out of range, duplicated index, bad JSON."""


class AdapterError(NeurontuneError):
    """An adapter directory is missing, corrupted, or does not fit the base model."""


class MainProcessError(NeurontuneError):
    """Raised on the other processes of a multi-process run when the main process failed (its message)."""
