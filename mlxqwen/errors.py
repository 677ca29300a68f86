"""The errors users meet, each with a one-line message that names the file, field or parameter."""


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or field at fault."""


class InsufficientMemoryError(ModelLoadError):
    """The model, at the context asked for, would not fit in this machine's memory."""


class ChatTemplateError(ModelLoadError):
    """The model's chat template fails: at load on a probe conversation, or on a conversation."""


class ContextLimitError(ValueError):
    """The conversation would not fit in the model's maximum context."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting for the model: try again later."""
