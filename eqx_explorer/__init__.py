"""eqx_explorer: see, click and export parameter freezing in Equinox models.

```python
import eqx_explorer as ex
spec = ex.FilterSpec(model).freeze("encoder")
params, static = eqx.partition(model, spec.tree)
print(ex.summary(model, spec))
```

The headless library needs only jax, equinox, optax and numpy: the widget stack (anywidget,
ipywidgets, treescope) is imported the first time `ex.Explorer` is used.
"""

from typing import TYPE_CHECKING, Any

from ._audit import assert_frozen_safe as assert_frozen_safe
from ._audit import audit_step as audit_step
from ._errors import ExplorerError as ExplorerError
from ._paths import format_path as format_path
from ._paths import parse_path as parse_path
from ._report import LeafReport as LeafReport
from ._report import StepReport as StepReport
from ._spec import FilterSpec as FilterSpec
from ._steps import StepProgress as StepProgress
from ._steps import StepRunner as StepRunner
from ._summary import summary as summary
from ._tree import ModelTree as ModelTree

if TYPE_CHECKING:
    from ._widget import Explorer as Explorer

__version__ = "0.1.0"
__all__ = [
    "Explorer",
    "ExplorerError",
    "FilterSpec",
    "LeafReport",
    "ModelTree",
    "StepProgress",
    "StepReport",
    "StepRunner",
    "assert_frozen_safe",
    "audit_step",
    "format_path",
    "parse_path",
    "summary",
]


def __getattr__(name: str) -> Any:
    # Scripts and test suites that never open a widget do not pay for importing one.
    if name == "Explorer":
        from ._widget import Explorer

        return Explorer
    raise AttributeError(f"module 'eqx_explorer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Explorer"])
