"""What differs between the IPython and ipywidgets versions torchmagic supports, kept in one place.

Supported: IPython >= 7.34 (Google Colab pins 7.34.0) with ipywidgets >= 7.7.1 (Colab: 7.7.1), up to
IPython 9 with ipywidgets 8. What code elsewhere must respect:

- ipywidgets 7 ignores keyword arguments it does not know (traitlets only warns), so an 8-only
  option silently does nothing there: `tooltip` exists only on buttons (7: `description_tooltip`),
  no `description_allow_html`, no `style` font/text colour traits outside buttons' `font_weight`
  and `button_color`, no `Stack` or `TagsInput`. The tests turn that warning into an error.
- ipywidgets 7 widgets render through `_ipython_display_`, 8 through `_repr_mimebundle_`: show a
  widget with `display(widget)` (or a `_ipython_display_` that calls it), never by asking the
  display formatter or `_repr_mimebundle_` for its bundle.
- Neither version accepts the `~` (trim zeros) readout format, e.g. ".2~e".
- An `Output` widget captures what is displayed in its `with` block on both, in a kernel only.

No IPython import here: the functions get the shell they work on."""
from __future__ import annotations


def running_cell_number(shell) -> int:
    """The prompt number of the cell being run. Recent IPython 9 releases count a cell before
    running it, older ones (7.34, 8) after, so `shell.execution_count` is off by one on one side
    or the other; the result object IPython keeps for the running cell has the number on both."""
    result = getattr(shell.displayhook, "exec_result", None)
    number = getattr(result, "execution_count", None)
    return number if number is not None else shell.execution_count
