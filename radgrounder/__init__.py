"""radgrounder: spatially grounded radiology vision-language models."""

from radgrounder.errors import RadGrounderError

__version__ = "0.1.0"

__all__ = ["RadGrounderError", "__version__"]
