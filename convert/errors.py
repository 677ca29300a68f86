class ConvertError(ValueError):
    """A conversion cannot go on; the message names the file, option or entry at fault."""
