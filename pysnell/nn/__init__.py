from .monarch_linear import MonarchLinear
from .snell_linear import SNELLLinear

__all__ = ["MonarchLinear", "SNELLLinear"]
