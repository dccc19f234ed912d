"""The one exception type the data package raises for bad inputs."""


class DataError(ValueError):
    """A data source, token file or sampler setting that cannot be used.

    A ValueError subclass so callers that already catch ValueError keep working; the
    message always names the offending path or setting and what was expected.
    """
