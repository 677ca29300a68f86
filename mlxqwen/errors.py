class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or field at fault."""
