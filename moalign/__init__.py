"""moalign: align language models to several objectives at once."""

from moalign.errors import MoalignError

__version__ = "0.1.0"

__all__ = ["MoalignError", "__version__"]
